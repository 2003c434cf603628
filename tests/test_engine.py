"""The engine: greedy output equals transformers' generate (base and adapter), adapters are pinned
per request across activations, bad adapters are refused, stop/cancel/back-pressure work."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from chatloop.adapters import AdapterError, AdapterRegistry
from chatloop.config import GenerationDefaults
from chatloop.engine import Engine, EngineBusy, GenerationFailed, GenerationParams, InvalidRequest
from chatloop.engine import slots as slots_module
from chatloop.models import load_model

MSGS = [{"role": "user", "content": "hello, who are you?"}]


def greedy(max_tokens=24, **kw) -> GenerationParams:
    return GenerationParams.from_request(GenerationDefaults(), temperature=0.0, max_tokens=max_tokens, **kw)


def make_adapter(model_dir: Path, out: Path, seed: int, rank: int = 4, alpha: int | None = None,
                 targets: tuple[str, ...] = ("q_proj", "v_proj")) -> Path:
    """A LoRA adapter with random (non-zero) weights, so it visibly changes the output."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    peft = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank if alpha is None else alpha,
                                           target_modules=list(targets), init_lora_weights=False,
                                           task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_" in n:
                p.mul_(3.0)
    peft.save_pretrained(out)
    return out


def reference_greedy(model_dir: Path, adapter: Path | None, max_tokens: int, penalty: float,
                     messages: list[dict[str, str]] = MSGS) -> list[int]:
    """What transformers' own ``generate`` produces alone (the engine's reference)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, repetition_penalty=penalty)
    toks = out[0][ids["input_ids"].shape[1]:].tolist()
    return toks[:-1] if toks and toks[-1] == tok.eos_token_id else toks


@pytest.fixture
def setup(tiny_model_dir, tmp_path):
    loaded = load_model(str(tiny_model_dir), tmp_path / "models")
    registry = AdapterRegistry(tmp_path / "adapters")
    v1 = registry.publish(make_adapter(tiny_model_dir, tmp_path / "a1", 1), {"parent": "base"})
    registry.publish(make_adapter(tiny_model_dir, tmp_path / "a2", 2), {"parent": v1})
    engine = Engine(loaded, registry, queue_size=2)
    engine.start()
    yield engine, registry, tiny_model_dir, tmp_path
    engine.stop()


def test_greedy_equals_generate_with_and_without_adapter(setup):
    engine, registry, model_dir, _ = setup
    base = engine.generate(MSGS, greedy())
    assert base.adapter_version == "base"
    ref = reference_greedy(model_dir, None, 24, 1.15)
    assert len(set(ref)) > 3, "the tiny model should not degenerate into one token"
    assert base.token_ids == ref
    engine.activate("v1")
    with_adapter = engine.generate(MSGS, greedy())
    assert with_adapter.adapter_version == "v1"
    assert with_adapter.token_ids == reference_greedy(model_dir, registry.path("v1"), 24, 1.15)
    assert with_adapter.token_ids != base.token_ids
    # an explicit per-request adapter and the base model, while v1 stays active
    assert engine.generate(MSGS, greedy(), adapter="v2").token_ids == reference_greedy(
        model_dir, registry.path("v2"), 24, 1.15)
    assert engine.generate(MSGS, greedy(), adapter="base").token_ids == ref
    assert engine.active_version == "v1"


def test_activation_mid_reply_keeps_the_reply_on_its_version(setup):
    engine, registry, model_dir, _ = setup
    expected_base = engine.generate(MSGS, greedy(max_tokens=60)).token_ids
    handle = engine.submit(MSGS, greedy(max_tokens=60))
    pieces = iter(handle)
    next(pieces)  # the reply is running
    engine.activate("v1")  # between two decode steps
    list(pieces)
    done = handle.result()
    assert done.adapter_version == "base" and done.token_ids == expected_base
    assert engine.generate(MSGS, greedy()).adapter_version == "v1"


@pytest.mark.parametrize("fold", [True, False])
def test_a_version_hot_swapped_into_a_used_slot_keeps_nothing_of_the_one_before(fold, tiny_model_dir, tmp_path):
    """Hot-swap copies a version into the spare slot's tensors. A version of the same rank with
    another lora_alpha, or with fewer target modules, must compute as it does alone: not with the
    slot's previous scaling, nor with the previous version's LoRA on the layers it leaves out."""
    loaded = load_model(str(tiny_model_dir), tmp_path / "models")
    registry = AdapterRegistry(tmp_path / "adapters")
    plan = [dict(alpha=8), dict(alpha=8), dict(alpha=2), dict(alpha=8, targets=("q_proj",))]
    versions = [registry.publish(make_adapter(tiny_model_dir, tmp_path / f"a{i}", 30 + i, **kw), {})
                for i, kw in enumerate(plan)]
    engine = Engine(loaded, registry, merge_single_version=fold)
    engine.start()
    try:
        for version in versions:  # the 3rd and 4th reuse the 1st's and 2nd's slots
            engine.activate(version)
            got = engine.generate(MSGS, greedy()).token_ids
            assert got == reference_greedy(tiny_model_dir, registry.path(version), 24, 1.15), version
        assert engine.adapter_slots == 2
    finally:
        engine.stop()


def test_a_hot_swap_into_slot_1_leaves_slot_10_alone(tiny_model_dir, tmp_path):
    """PEFT's hot-swap finds a slot's tensors by substring; a slot named like a part of another's
    (slot1 in slot10) would have had the other slot's LoRA zeroed: a version in use lost."""
    loaded = load_model(str(tiny_model_dir), tmp_path / "models")
    registry = AdapterRegistry(tmp_path / "adapters")
    v1, v2, v3 = (registry.publish(make_adapter(tiny_model_dir, tmp_path / f"a{i}", 40 + i), {}) for i in range(3))
    engine = Engine(loaded, registry)  # not started: this thread is the engine's
    with torch.inference_mode():
        engine._ensure_loaded(v1)
        engine._slot_counter = 9
        engine._ensure_loaded(v2)  # the tenth slot, beside the first
        before = engine._probe_logits([v2, "base"])
        engine._slots[engine._slot_of.pop(v1)] = None  # v1's slot becomes the spare
        engine._ensure_loaded(v3)
        assert engine.adapter_slots == 2, "v3 did not hot-swap into the spare"
        after = engine._probe_logits([v2, v3, "base"])
    assert torch.equal(after[0], before[0]) and torch.equal(after[2], before[1])
    assert not torch.allclose(after[1], after[2])  # v3 is served, not base


def _new_slots_built(engine: Engine, monkeypatch) -> list[str]:
    """The slots ``engine`` builds from here on by loading an adapter (not by hot-swapping one)."""
    built: list[str] = []
    load = engine.model.load_adapter

    def counting(*args, **kwargs):
        built.append(kwargs.get("adapter_name"))
        return load(*args, **kwargs)

    monkeypatch.setattr(engine.model, "load_adapter", counting)
    return built


def _wait_for_spare(engine: Engine) -> None:
    deadline = time.monotonic() + 30
    while not engine.spare_ready and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.spare_ready, "no spare slot was built again"


@pytest.mark.parametrize("fold", [True, False])
def test_a_spare_slot_of_the_training_shape_makes_every_activation_a_hot_swap(fold, tiny_model_dir, tmp_path,
                                                                             monkeypatch):
    """Given the shape training publishes (``spare_lora``), the engine has a spare slot before it
    serves and builds one again after an activation used it (here while a reply runs, between two
    of its steps): every activation copies weights into a slot, none builds one, and none needs
    PEFT's hot-swap (the versions' tensors are the slot's: a copy into each). The zero spare
    changes no reply, the one running across the activations and rebuilds included, and memory
    stays at the versions in use plus one spare."""
    loaded = load_model(str(tiny_model_dir), tmp_path / "models")
    registry = AdapterRegistry(tmp_path / "adapters")
    versions = [registry.publish(make_adapter(tiny_model_dir, tmp_path / f"a{i}", 50 + i), {}) for i in range(3)]
    shape = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["v_proj", "q_proj"], task_type="CAUSAL_LM")
    engine = Engine(loaded, registry, merge_single_version=fold, spare_lora=shape, spare_wait_s=0.0)
    engine.start()
    try:
        assert engine.spare_ready and engine.adapter_slots == 1 and engine.loaded_adapters == set()
        assert engine.generate(MSGS, greedy()).token_ids == reference_greedy(tiny_model_dir, None, 24, 1.15)
        built = _new_slots_built(engine, monkeypatch)
        peft_swaps: list[str] = []
        monkeypatch.setattr(slots_module, "hotswap_adapter_from_state_dict",
                            lambda *a, **kw: peft_swaps.append(kw["adapter_name"]))
        running = engine.submit(MSGS, greedy(max_tokens=400))
        pieces = iter(running)
        next(pieces)
        for version in versions:
            engine.activate(version)
            got = engine.generate(MSGS, greedy()).token_ids
            assert got == reference_greedy(tiny_model_dir, registry.path(version), 24, 1.15), version
            _wait_for_spare(engine)
        assert not running.done, "the long reply should still run across the activations"
        assert built == [], f"activations built slots {built} instead of hot-swapping into the spare"
        assert peft_swaps == [], f"slots {peft_swaps} went through PEFT's hot-swap instead of a copy"
        list(pieces)
        assert running.result().token_ids == reference_greedy(tiny_model_dir, None, 400, 1.15)
        assert engine.loaded_adapters == {versions[-1]} and engine.adapter_slots == 2
    finally:
        engine.stop()
    assert not getattr(loaded.model, "peft_config", {}), "the engine left LoRA slots in the model"


def test_the_spare_slot_follows_the_shape_of_what_is_activated(tiny_model_dir, tmp_path, monkeypatch, caplog):
    """A spare of another shape than the version activated is dropped for a slot of the version's
    own; the next spare takes the version's shape, so the next activation is a hot-swap again. A
    shape the model cannot take (no such layers) is given up on once, and serving goes on."""
    loaded = load_model(str(tiny_model_dir), tmp_path / "models")
    registry = AdapterRegistry(tmp_path / "adapters")
    v1, v2 = (registry.publish(make_adapter(tiny_model_dir, tmp_path / f"a{i}", 60 + i), {}) for i in range(2))
    engine = Engine(loaded, registry, spare_lora=LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj"]))
    engine.start()
    try:
        built = _new_slots_built(engine, monkeypatch)
        engine.activate(v1)  # rank 4 on q and v: the rank-8 spare cannot take it
        assert len(built) == 1 and engine.adapter_slots == 1
        engine.generate(MSGS, greedy(max_tokens=2))
        _wait_for_spare(engine)
        engine.activate(v2)
        assert len(built) == 1, "the second activation should have hot-swapped into the new spare"
        assert engine.generate(MSGS, greedy()).token_ids == reference_greedy(tiny_model_dir, registry.path(v2), 24, 1.15)
    finally:
        engine.stop()

    engine = Engine(loaded, registry, spare_lora=LoraConfig(r=4, target_modules=["no_such_proj"]))
    with caplog.at_level("ERROR", logger="chatloop.engine"):
        engine.start()
        try:
            assert not engine.spare_ready and engine.adapter_slots == 0
            engine.activate(v1)
            assert engine.generate(MSGS, greedy()).token_ids == reference_greedy(tiny_model_dir, registry.path(v1), 24, 1.15)
        finally:
            engine.stop()
    assert sum("spare LoRA slot" in r.getMessage() for r in caplog.records) == 1


def test_unused_adapters_are_unloaded(setup):
    engine, *_ = setup
    for v in ["v1", "v2", "v1", "v2", "base", "v1"]:
        engine.activate(v)
        engine.generate(MSGS, greedy(max_tokens=2))
    assert engine.loaded_adapters == {"v1"}
    engine.generate(MSGS, greedy(max_tokens=2), adapter="v2")
    assert engine.loaded_adapters == {"v1"}


def test_corrupt_and_mismatched_adapters_are_refused_and_active_keeps_serving(setup, tmp_path_factory):
    engine, registry, model_dir, tmp = setup
    engine.activate("v1")
    corrupt = tmp / "corrupt"
    make_adapter(model_dir, corrupt, 3)
    (corrupt / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterError):
        registry.publish(corrupt, {})
    # a well-formed adapter for a different model (hidden size 32 instead of 64)
    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny import build_tiny_model

    other = build_tiny_model(tmp_path_factory.mktemp("other-model"), hidden=32)
    v3 = registry.publish(make_adapter(other, tmp / "other-adapter", 4), {})
    with pytest.raises(AdapterError, match="cannot be loaded"):
        engine.activate(v3)
    assert engine.active_version == "v1"
    assert engine.generate(MSGS, greedy(max_tokens=4)).adapter_version == "v1"
    # damaged after publish: refused too
    (registry.path("v2") / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(AdapterError):
        engine.activate("v2")
    with pytest.raises(AdapterError):
        engine.activate("v99")
    assert engine.active_version == "v1"


def test_stop_strings_cut_the_reply(setup):
    engine, *_ = setup
    full = engine.generate(MSGS, greedy(max_tokens=30)).text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip()
    cut = engine.generate(MSGS, greedy(max_tokens=30, stop=[stop]))
    assert cut.finish_reason == "stop"
    assert cut.text == full[: full.index(stop)]
    streamed = "".join(engine.submit(MSGS, greedy(max_tokens=30, stop=[stop])))
    assert streamed == cut.text


def test_cancel_and_busy_queue(tiny_loaded, tmp_path):
    engine = Engine(tiny_loaded, AdapterRegistry(tmp_path / "adapters"), queue_size=2, max_batch=2)
    engine.start()
    try:
        long = greedy(max_tokens=400)
        running = [engine.submit(MSGS, long), engine.submit(MSGS, long)]
        for h in running:
            next(iter(h))  # both rows are in the batch, which is full
        queued = [engine.submit(MSGS, long), engine.submit(MSGS, long)]  # queue_size=2
        with pytest.raises(EngineBusy):
            engine.submit(MSGS, long)
        for h in [*running, *queued]:
            h.cancel()
        assert all(h.result(timeout=30).finish_reason == "cancelled" for h in [*running, *queued])
        assert engine.running() == 0 and engine.queue_depth() == 0
    finally:
        engine.stop()


def test_seeded_sampling_is_reproducible(setup):
    engine, *_ = setup
    p = GenerationParams.from_request(GenerationDefaults(), temperature=1.0, max_tokens=12, seed=7)
    assert engine.generate(MSGS, p).token_ids == engine.generate(MSGS, p).token_ids


@pytest.mark.parametrize("given, message", [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 10**6}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"repetition_penalty": 0.5}, "repetition_penalty"),
    ({"stop": [""]}, "stop"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"seed": -3}, "seed"),
    ({"bogus": 1}, "bogus"),
])
def test_bad_generation_settings_are_refused(given, message):
    with pytest.raises(InvalidRequest, match=message):
        GenerationParams.from_request(GenerationDefaults(), **given)


def _healthy(seed: int) -> GenerationParams:
    return GenerationParams.from_request(GenerationDefaults(), temperature=0.9, max_tokens=16, seed=seed)


HOSTILE = [  # accepted settings at the numeric edge: each must give a reply, and harm no one
    {"temperature": 1e-40}, {"temperature": 1e-46}, {"temperature": 2e-38, "top_p": 1e-300},
    {"temperature": 5e-324, "top_k": 1}, {"temperature": 2.0, "top_p": 1e-45, "repetition_penalty": 2.0},
    {"temperature": 1e-5, "top_k": 1000, "top_p": 1.0},
]


@pytest.fixture
def roomy(tiny_model_dir, tmp_path):
    """An engine with room for a dozen requests at once (``setup``'s queue holds two)."""
    registry = AdapterRegistry(tmp_path / "adapters")
    engine = Engine(load_model(str(tiny_model_dir), tmp_path / "models"), registry, queue_size=16)
    engine.start()
    yield engine, registry, tiny_model_dir, tmp_path
    engine.stop()


def test_degenerate_settings_neither_fail_nor_harm_the_batch(roomy):
    """Issue 19: a temperature of 1e-40 used to give NaN, and torch.multinomial's error failed
    every reply in the batch. Now such rows are answered, and seeded neighbours are unchanged."""
    engine, *_ = roomy
    alone = [engine.generate(MSGS, _healthy(s)).token_ids for s in range(3)]
    greedy_reply = engine.generate(MSGS, greedy(max_tokens=16)).token_ids
    healthy = [engine.submit(MSGS, _healthy(s)) for s in range(3)]
    hostile = [engine.submit(MSGS, GenerationParams.from_request(GenerationDefaults(), max_tokens=16, **h))
               for h in HOSTILE]
    assert [h.result(timeout=120).token_ids for h in healthy] == alone
    replies = [h.result(timeout=120) for h in hostile]
    assert all(r.completion_tokens > 0 for r in replies)
    assert replies[0].token_ids[:len(greedy_reply)] == greedy_reply[:len(replies[0].token_ids)]


def test_a_row_whose_logits_are_not_finite_fails_alone(roomy, tmp_path_factory):
    """A diverged adapter (NaN weights) served beside the base model: its rows end with a clear
    error, the base rows in the same batch finish exactly as they would alone."""
    from safetensors.torch import load_file, save_file

    engine, registry, model_dir, _ = roomy
    bad = make_adapter(model_dir, tmp_path_factory.mktemp("nan") / "a", 5)
    weights = load_file(bad / "adapter_model.safetensors")
    save_file({k: torch.full_like(v, float("nan")) for k, v in weights.items()},
              str(bad / "adapter_model.safetensors"))
    version = registry.publish(bad, {"parent": "base"})
    alone = [engine.generate(MSGS, _healthy(s)).token_ids for s in range(3)]
    healthy = [engine.submit(MSGS, _healthy(s)) for s in range(3)]
    poisoned = [engine.submit(MSGS, p, adapter=version) for p in (_healthy(9), greedy(max_tokens=16))]
    assert [h.result(timeout=120).token_ids for h in healthy] == alone
    for handle in poisoned:
        with pytest.raises(GenerationFailed, match="not finite"):
            handle.result(timeout=120)
    assert engine.generate(MSGS, _healthy(0)).token_ids == alone[0]  # and the engine serves on
