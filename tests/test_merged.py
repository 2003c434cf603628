"""The single-version fast path (``chatloop.engine.merged``): one version in flight is served from
weights with its LoRA folded in, token for token what PEFT's ``merge_and_unload`` model generates;
mixed batches go back to the per-row LoRA forward; the base weights come back bit for bit after
any number of switches, and the engine leaves the model as it found it."""

from __future__ import annotations

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from test_batching import PROMPTS
from test_engine import greedy, make_adapter, reference_greedy

from chatloop.adapters import AdapterRegistry
from chatloop.engine import Engine


def merged_reference(model_dir, adapter, max_tokens, messages):
    """Greedy tokens of the base model with ``adapter`` merged by PEFT (the folded path's reference)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter).merge_and_unload()
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, repetition_penalty=1.15)
    toks = out[0][ids["input_ids"].shape[1]:].tolist()
    return toks[:-1] if toks and toks[-1] == tok.eos_token_id else toks


def base_weights(model) -> dict[str, torch.Tensor]:
    """The model's own weights by their plain names (a LoRA-wrapped layer's are under base_layer)."""
    return {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}


def lora_layers_off(model) -> bool:
    """No LoRA layer in the forward path: PEFT's wrappers are taken out of the model."""
    return not any(isinstance(m, LoraLayer) for m in model.modules())


def lora_layers_on(model) -> bool:
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    return bool(layers) and not any(m._disable_adapters for m in layers)


def test_one_version_in_flight_is_served_from_folded_weights_token_for_token(tiny_model_dir, tiny_loaded, tmp_path):
    registry = AdapterRegistry(tmp_path / "adapters")
    v1 = registry.publish(make_adapter(tiny_model_dir, tmp_path / "a1", 11), {})
    original = {k: v.clone() for k, v in base_weights(tiny_loaded.model).items()}
    for fold in (True, False):
        engine = Engine(tiny_loaded, registry, max_batch=4, merge_single_version=fold)
        engine.start()
        try:
            engine.activate(v1)
            got = [engine.generate(p, greedy(max_tokens=20)).token_ids for p in PROMPTS[:2]]
            if fold:
                assert engine._merged_version == v1 and lora_layers_off(tiny_loaded.model)
                assert got == [merged_reference(tiny_model_dir, registry.path(v1), 20, p) for p in PROMPTS[:2]]
            else:
                assert engine._merged_version is None and engine.weight_switches == 0
                assert got == [reference_greedy(tiny_model_dir, registry.path(v1), 20, 1.15, p) for p in PROMPTS[:2]]
            base = engine.generate(PROMPTS[0], greedy(max_tokens=12), adapter="base").token_ids
            assert base == reference_greedy(tiny_model_dir, None, 12, 1.15, PROMPTS[0])
            assert engine._merged_version is None  # base alone: the base weights back in place
        finally:
            engine.stop()
        now = base_weights(tiny_loaded.model)
        assert now.keys() == original.keys()
        assert all(torch.equal(now[k], v) for k, v in original.items()), "the engine changed the model"


def test_switching_between_mixed_and_single_version_batches_restores_the_base_weights_exactly(
        tiny_model_dir, tiny_loaded, tmp_path):
    registry = AdapterRegistry(tmp_path / "adapters")
    v1 = registry.publish(make_adapter(tiny_model_dir, tmp_path / "a1", 21), {})
    v2 = registry.publish(make_adapter(tiny_model_dir, tmp_path / "a2", 22), {})
    engine = Engine(tiny_loaded, registry, max_batch=8)
    engine.start()
    try:
        for round_ in range(3):
            engine.activate(v1 if round_ % 2 == 0 else v2)
            # a long base row keeps the batch mixed while the others join and leave
            long = engine.submit(PROMPTS[0], greedy(max_tokens=30), adapter="base")
            next(iter(long))
            short = [engine.submit(PROMPTS[1 + i % 3], greedy(max_tokens=6), adapter=v) for i, v in
                     enumerate([v1, v2, None])]
            mixed = [h.result(60).token_ids for h in short]
            assert long.result(60).token_ids == reference_greedy(tiny_model_dir, None, 30, 1.15, PROMPTS[0])
            for (i, v), got in zip(enumerate([v1, v2, engine.active_version]), mixed):
                assert got == reference_greedy(tiny_model_dir, registry.path(v), 6, 1.15, PROMPTS[1 + i % 3])
            alone = engine.generate(PROMPTS[1], greedy(max_tokens=12)).token_ids  # one version: folded
            assert engine._merged_version == engine.active_version
            assert alone == merged_reference(tiny_model_dir, registry.path(engine.active_version), 12, PROMPTS[1])
        assert engine.weight_switches == 5  # a fold per round and a restore per later round: no thrash
        engine.activate("base")
        assert engine.generate(PROMPTS[2], greedy(max_tokens=12)).token_ids == reference_greedy(
            tiny_model_dir, None, 12, 1.15, PROMPTS[2])
    finally:
        engine.stop()
    fresh = type(tiny_loaded.model).from_pretrained(tiny_model_dir)
    now = base_weights(tiny_loaded.model)
    assert now.keys() == fresh.state_dict().keys()
    for k, v in fresh.state_dict().items():
        assert torch.equal(now[k], v), f"{k} drifted after many folds and restores"
