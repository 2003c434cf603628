"""Chunked prefill: a long prompt that arrives while other replies decode is prefilled a chunk
per step between their decode steps (they keep streaming), and every reply is still exactly
what it is alone, with fixed or paced chunks; a long prompt cancelled mid-prefill ends alone.
The pacing itself and the KV cache's in-place writes: test_kvcache.py."""

from __future__ import annotations

import math
import threading
import time

import pytest
from test_batching import PROMPTS
from test_engine import greedy, make_adapter, reference_greedy

from chatloop.adapters import AdapterRegistry
from chatloop.engine import Engine

LONG = [{"role": "user", "content": "Please read this carefully. " * 12 + "Now, what is the point of it all?"}]


@pytest.mark.parametrize("budget, chunk_tokens", [(0.0, 12), (1e-9, 2)], ids=["fixed", "paced"])
def test_a_long_prompt_joins_in_chunks_while_the_others_keep_streaming(tiny_model_dir, tiny_loaded, tmp_path,
                                                                      budget, chunk_tokens):
    # fixed: every chunk is prefill_chunk (12) tokens; paced with a budget no chunk fits in:
    # every chunk is the pacer's smallest for a chunk riding in the decode step (2; each rides in
    # one here: test_ragged.py), and the replies are the same either way
    registry = AdapterRegistry(tmp_path / "adapters")
    v1 = registry.publish(make_adapter(tiny_model_dir, tmp_path / "a1", 31), {})
    engine = Engine(tiny_loaded, registry, max_batch=8, prefill_chunk=12, prefill_budget=budget)
    engine.start()
    try:
        running = engine.submit(PROMPTS[1], greedy(max_tokens=60), adapter="base")
        stamps: list[float] = []
        reader = threading.Thread(target=lambda: [stamps.append(time.perf_counter()) for _ in running])
        reader.start()
        while not stamps:
            time.sleep(0.001)
        t0 = time.perf_counter()
        long = engine.submit(LONG, greedy(max_tokens=10), adapter=v1)
        prompt_tokens = len(engine._encode(LONG))
        pieces = iter(long)
        next(pieces)
        t1 = time.perf_counter()
        got_long = long.result(60)
        reader.join(60)
        got = running.result(60)
        chunks = math.ceil(prompt_tokens / chunk_tokens)
        assert prompt_tokens > 40 and engine.prefill_chunks == chunks
        # the running reply kept streaming while the long prompt was prefilled
        assert sum(t0 <= t <= t1 for t in stamps) >= chunks // 2, (chunks, len(stamps))
        assert got_long.token_ids == reference_greedy(tiny_model_dir, registry.path(v1), 10, 1.15, LONG)
        assert got.token_ids == reference_greedy(tiny_model_dir, None, 60, 1.15, PROMPTS[1])
        # alone (nothing else decoding), a long prompt is prefilled at once
        before = engine.prefill_chunks
        assert engine.generate(LONG, greedy(max_tokens=10), adapter=v1).token_ids == got_long.token_ids
        assert engine.prefill_chunks == before
    finally:
        engine.stop()


def test_a_long_prompt_cancelled_during_its_prefill_ends_alone(tiny_loaded, tmp_path):
    engine = Engine(tiny_loaded, AdapterRegistry(tmp_path / "adapters"), max_batch=8, prefill_chunk=4)
    engine.start()
    try:
        running = engine.submit(PROMPTS[1], greedy(max_tokens=40))
        next(iter(running))
        long = engine.submit(LONG, greedy(max_tokens=10))
        while engine.prefill_chunks == 0:
            time.sleep(0.001)
        long.cancel()
        assert long.result(60).finish_reason == "cancelled" and long.result(60).completion_tokens == 0
        assert running.result(60).finish_reason in ("stop", "length") and running.result(60).completion_tokens > 0
        assert engine.generate(PROMPTS[0], greedy(max_tokens=4)).completion_tokens > 0  # still serving
    finally:
        engine.stop()
