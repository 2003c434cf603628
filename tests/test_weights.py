"""Packed serving weights (``chatloop.engine.weights``): each format computes with the weights it
claims (int4 recovers Q4_1 codes exactly), PEFT's LoRA wraps packed layers, and the engine's greedy
output equals ``generate`` of a model packed the same way, alone, with a LoRA version served fused,
unmerged, and inside a mixed-version batch."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from test_batching import PROMPTS
from test_engine import greedy, make_adapter
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatloop.adapters import AdapterRegistry
from chatloop.config import ConfigError, load_settings
from chatloop.engine import Engine
from chatloop.engine.weights import GROUP, PACKED_MAX_POSITIONS, PackedLinear, pack_for_serving, prefill_dtype, resolve_serve_weights
from chatloop.models import load_model


def q4_1_weight(out_f: int, in_f: int, seed: int = 0) -> torch.Tensor:
    """A weight as a Q4_1 GGUF de-quantizes: per group of 32, code * d + m with codes 0..15, the
    group's minimum and maximum codes present (llama.cpp's rule puts them there)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (out_f, in_f // GROUP, GROUP), generator=g).float()
    codes[..., 0], codes[..., 1] = 0, 15
    d = (torch.rand(out_f, in_f // GROUP, 1, generator=g) * 0.01 + 1e-3).half().float()
    m = (-(torch.rand(out_f, in_f // GROUP, 1, generator=g) * 0.1)).half().float()
    return (codes * d + m).reshape(out_f, in_f), codes.reshape(out_f, in_f), d, m


def test_int4_recovers_q4_1_codes_and_rounds_only_its_scales():
    w, codes, d, m = q4_1_weight(48, 96)
    layer = torch.nn.Linear(96, 48, bias=False)
    layer.weight.data.copy_(w)
    packed = PackedLinear(layer, "int4")
    # the reference, computed another way: the kernel reads (code - 8) * scale + zero in bf16
    scale, zero = d.bfloat16().float(), (m + 8 * d).bfloat16().float()
    expected = ((codes.reshape(48, 3, GROUP) - 8) * scale + zero).reshape(48, 96)
    got = packed.dequantized()
    assert torch.allclose(got, expected.bfloat16().float(), atol=1e-6)  # the kernel's output is bf16
    # every code exact, only the bf16 scales differ from the GGUF's: under half a step per group
    assert ((w - expected).reshape(48, 3, GROUP).abs() / d).max() < 0.5


@pytest.mark.parametrize("dense_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fmt, tolerance", [("bf16", 0.01), ("int8", 0.03), ("int4", 0.1)])
def test_each_format_computes_close_to_fp32_and_keeps_dtype_and_bias(fmt, tolerance, dense_dtype):
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 32)
    packed = PackedLinear(layer, fmt, dense_dtype)
    decode, prefill = torch.randn(3, 1, 64), torch.randn(3, PACKED_MAX_POSITIONS + 1, 64)
    short = torch.randn(3, PACKED_MAX_POSITIONS, 64)  # a short prompt or a small chunk of a long one
    with torch.no_grad():
        for x in (decode, prefill, short):
            want, got = layer(x), packed(x)
            assert got.dtype == x.dtype and got.shape == want.shape
            assert (got - want).norm() / want.norm() < tolerance
        # a decode step computes x (as bf16) times the packed weight, plus the bias; a prefill
        # (several positions per row) the dense copy: bf16, or the fp32 weight itself
        manual = (decode.bfloat16().float() @ packed.dequantized().t()) + layer.bias
        assert torch.allclose(packed(decode), manual, atol=1e-2, rtol=1e-2)
        # up to PACKED_MAX_POSITIONS per row stay on the packed kernels, whatever the copy
        # (streaming it costs more than they do); the bf16 format has no other weight than its copy
        on_packed = (short.bfloat16().float() @ packed.dequantized().t()) + layer.bias
        on_copy = (short.bfloat16().float() @ packed.dense.float().t()) + layer.bias
        if fmt != "bf16":
            assert torch.allclose(packed(short), on_packed, atol=1e-2, rtol=1e-2)
            assert not torch.allclose(packed(short), on_copy, atol=1e-3)  # not the dense copy
        else:
            assert torch.allclose(packed(short), on_copy, atol=1e-2, rtol=1e-2)
        if fmt == "bf16" or dense_dtype == torch.bfloat16:
            assert packed.dense.dtype == torch.bfloat16
            dense = (prefill.bfloat16().float() @ layer.weight.bfloat16().float().t()) + layer.bias
            assert torch.allclose(packed(prefill), dense, atol=1e-2, rtol=1e-2)
        else:
            assert packed.dense.data_ptr() == layer.weight.data_ptr()  # the weight itself, not a copy
            assert torch.allclose(packed(prefill), layer(prefill), atol=1e-6)
        # which path runs depends on positions per row only: a row alone equals it in a batch
        assert torch.equal(packed(decode[1:2]), packed(decode)[1:2])


def test_the_prefill_copy_is_bf16_only_where_onednn_computes_bf16_natively(monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert prefill_dtype() == torch.bfloat16
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert prefill_dtype() == torch.float32
    assert PackedLinear(torch.nn.Linear(64, 32), "int4").dense.dtype == torch.float32
    assert PackedLinear(torch.nn.Linear(64, 32), "bf16").dense.dtype == torch.bfloat16  # the format itself


def test_pack_for_serving_packs_every_linear_and_the_head_as_int8(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    linears = sum(type(m) is torch.nn.Linear for m in model.modules())
    counts = pack_for_serving(model, "int4")
    assert counts == {"int4": linears - 1, "int8": 1}  # the tied output head: int8
    assert model.get_output_embeddings().fmt == "int8"
    assert model.get_input_embeddings().weight.dtype == torch.float32  # the lookup keeps its weights
    assert pack_for_serving(model, "int4") == {}  # idempotent: nothing left to pack
    assert pack_for_serving(AutoModelForCausalLM.from_pretrained(tiny_model_dir), "fp32") == {}


def test_serve_weights_setting_is_checked():
    assert resolve_serve_weights("auto", torch.device("cpu")) == "int4"
    assert resolve_serve_weights("auto", torch.device("cuda")) == "fp32"
    with pytest.raises(ValueError, match="CPU kernels"):
        resolve_serve_weights("int4", torch.device("cuda"))
    assert load_settings(environ={}, overrides={"serve_weights": "int8"}).serve_weights == "int8"
    with pytest.raises(ConfigError, match="serve_weights"):
        load_settings(environ={}, overrides={"serve_weights": "q4_k"})


def packed_reference(model_dir, fmt, adapter, max_tokens, messages, dense=None):
    """``generate``'s greedy tokens from a model packed as ``fmt`` (with ``adapter`` through PEFT)."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    pack_for_serving(model, fmt, dense)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, repetition_penalty=1.15)
    toks = out[0][ids["input_ids"].shape[1]:].tolist()
    return toks[:-1] if toks and toks[-1] == tok.eos_token_id else toks


# each format, prefilling through either dense copy (a machine has one of them by default). int4 with
# its bf16 copy once diverged here on native-bf16 CPUs (a one-bf16-step logit difference from batched
# attention flipped an exact tie; docs/LOG.md 2026-12-05): the engine's row-invariant attention fixed it
@pytest.mark.parametrize("fmt, dense", [("bf16", None), ("int8", torch.float32), ("int8", torch.bfloat16),
                                        ("int4", torch.float32), ("int4", torch.bfloat16)])
def test_engine_greedy_equals_generate_of_the_same_packed_weights(fmt, dense, tiny_model_dir, tmp_path):
    loaded = load_model(str(tiny_model_dir), tmp_path / "models")
    pack_for_serving(loaded.model, fmt, dense)
    registry = AdapterRegistry(tmp_path / "adapters")
    v1 = registry.publish(make_adapter(tiny_model_dir, tmp_path / "a1", 1), {})
    v2 = registry.publish(make_adapter(tiny_model_dir, tmp_path / "a2", 2), {})
    engine = Engine(loaded, registry, max_batch=8)
    engine.start()
    try:
        engine.activate(v1)
        # one version in flight: served fused (the packed layers hold its LoRA factors)
        alone = engine.generate(PROMPTS[0], greedy(max_tokens=20)).token_ids
        assert engine._merged_version == v1 and engine._fused
        assert alone == packed_reference(tiny_model_dir, fmt, registry.path(v1), 20, PROMPTS[0], dense)
        base = engine.generate(PROMPTS[1], greedy(max_tokens=16), adapter="base").token_ids
        assert not engine._fused and not any(m.fused for m in loaded.model.modules() if isinstance(m, PackedLinear))
        assert base == packed_reference(tiny_model_dir, fmt, None, 16, PROMPTS[1], dense)
        # mixed versions: PEFT's per-row LoRA forward over the packed base layers
        first = engine.submit(PROMPTS[2], greedy(max_tokens=30), adapter="base")
        next(iter(first))
        plan = [(PROMPTS[1], v1, 24), (PROMPTS[3], v2, 20), (PROMPTS[0], v2, 12)]
        handles = [engine.submit(m, greedy(max_tokens=n), adapter=a) for m, a, n in plan]
        results = [first.result(60)] + [h.result(60) for h in handles]
        assert engine.peak_batch >= 3
        for (messages, version, n), got in zip([(PROMPTS[2], "base", 30), *plan], results):
            adapter_dir = None if version == "base" else registry.path(version)
            assert got.token_ids == packed_reference(tiny_model_dir, fmt, adapter_dir, n, messages, dense), (fmt, version)
    finally:
        engine.stop()
