"""A long prompt's chunk riding in the running rows' decode step (engine/ragged.py): one forward for
both, and every reply exactly what it is when the chunk is a forward of its own; the running rows
still equal ``generate`` of the same weights, with mixed adapter versions and packed weights."""

from __future__ import annotations

import math

import pytest
import torch
from test_batching import PROMPTS
from test_chunked_prefill import LONG
from test_engine import greedy, make_adapter, reference_greedy
from test_weights import packed_reference

from chatloop.adapters import AdapterRegistry
from chatloop.engine import Engine
from chatloop.engine.weights import pack_for_serving
from chatloop.models import load_model


def long_joins_two_running_rows(engine: Engine, v1: str, v2: str) -> tuple[list[list[int]], int, int]:
    """Two rows (base and v1) decoding when a long prompt (v2) arrives: every reply's tokens, and
    how many chunks the long prompt took and how many of them rode in a decode step."""
    running = [engine.submit(PROMPTS[1], greedy(max_tokens=60), adapter="base"),
               engine.submit(PROMPTS[2], greedy(max_tokens=60), adapter=v1)]  # may itself go in chunks
    for handle in running:
        next(iter(handle))
    chunks, shared = engine.prefill_chunks, engine.shared_chunks
    long = engine.submit(LONG, greedy(max_tokens=10), adapter=v2)
    replies = [h.result(60).token_ids for h in (*running, long)]
    return replies, engine.prefill_chunks - chunks, engine.shared_chunks - shared


@pytest.mark.parametrize("fmt", ["fp32", "int4"])
def test_a_chunk_riding_in_the_decode_step_changes_no_reply(fmt, tiny_model_dir, tmp_path):
    loaded = load_model(str(tiny_model_dir), tmp_path / "models")
    pack_for_serving(loaded.model, fmt, torch.bfloat16)
    registry = AdapterRegistry(tmp_path / "adapters")
    v1 = registry.publish(make_adapter(tiny_model_dir, tmp_path / "a1", 41), {})
    v2 = registry.publish(make_adapter(tiny_model_dir, tmp_path / "a2", 42), {})
    # fixed chunks of 12 tokens (budget 0), so both runs cut the prompt at the same places
    engine = Engine(loaded, registry, max_batch=8, prefill_chunk=12, prefill_budget=0.0)
    engine.start()
    try:
        chunks = math.ceil(len(engine._encode(LONG)) / 12)
        shared, taken, rode = long_joins_two_running_rows(engine, v1, v2)
        assert taken == rode == chunks  # every chunk rode in a decode step
        engine.ragged_chunks = False
        alone, taken, rode = long_joins_two_running_rows(engine, v1, v2)
        assert taken == chunks and rode == 0
    finally:
        engine.stop()
    assert shared == alone
    # the first running row (prefilled whole) is what generate gives alone; so are the others in
    # fp32 (packed, a prompt prefilled in chunks ran on the decode kernels, which generate's whole
    # prefill does not: not the same weights' products)
    assert shared[0] == packed_reference(tiny_model_dir, fmt, None, 60, PROMPTS[1], torch.bfloat16)
    if fmt == "fp32":
        assert shared[1] == reference_greedy(tiny_model_dir, registry.path(v1), 60, 1.15, PROMPTS[2])
        assert shared[2] == reference_greedy(tiny_model_dir, registry.path(v2), 10, 1.15, LONG)


@pytest.mark.parametrize("fmt, block", [("fp32", 1), ("int4", 4)])
def test_a_riding_chunk_fills_the_int4_kernels_last_block_of_rows(fmt, block, tiny_model_dir, tmp_path):
    # paced with a budget no chunk fits in, a riding chunk has the pacer's least size (2); beside one
    # running row, int4 (rows in blocks of 4) takes one more token for free: 1 + 3 rows fill a block
    loaded = load_model(str(tiny_model_dir), tmp_path / "models")
    pack_for_serving(loaded.model, fmt, torch.bfloat16)
    engine = Engine(loaded, AdapterRegistry(tmp_path / "adapters"), max_batch=8, prefill_chunk=12,
                    prefill_budget=1e-9)
    assert engine._row_block == block
    engine.start()
    try:
        running = engine.submit(PROMPTS[0], greedy(max_tokens=200))
        next(iter(running))
        before = engine.shared_chunks
        long = engine.generate(LONG, greedy(max_tokens=2))
        assert long.completion_tokens > 0 and running.result(60).completion_tokens > 0
        assert engine.shared_chunks - before == math.ceil(len(engine._encode(LONG)) / (2 if block == 1 else 3))
    finally:
        engine.stop()
