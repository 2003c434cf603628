"""The engine's KV cache layers (written in place into buffers with spare columns) against
transformers' own ``DynamicLayer``, and the prefill pacer's chunk sizes."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from chatloop.engine import kvcache
from chatloop.engine.pacing import PrefillPacer


def growing_cache(layers: int) -> DynamicCache:
    cache = DynamicCache()
    cache.layers = [kvcache.GrowingLayer() for _ in range(layers)]
    return cache


def states(rows: int, columns: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 3, columns, 8, generator=g), torch.randn(rows, 3, columns, 8, generator=g)


def test_a_growing_layer_holds_what_a_dynamic_layer_holds_without_copying_every_step():
    plain, growing = DynamicLayer(), kvcache.GrowingLayer()
    ptrs = set()
    for step, columns in enumerate([5, 1, 1, 1, 3, *[1] * 100]):
        k, v = states(2, columns, step)
        want, got = plain.update(k, v), growing.update(k, v)
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
        assert growing.get_seq_length() == plain.get_seq_length()
        ptrs.add(growing._kbuf.data_ptr())
    # 111 columns written in 105 steps into a handful of buffers: it grows, it does not copy per step
    assert 2 <= len(ptrs) <= 3
    assert growing._kbuf.shape[-2] > growing.get_seq_length()


def test_a_growing_layer_recovers_when_its_keys_are_replaced_from_outside():
    plain, growing = DynamicLayer(), kvcache.GrowingLayer()
    for step in range(4):
        k, v = states(2, 3, step)
        plain.update(k, v), growing.update(k, v)
    for layer in (plain, growing):
        layer.crop(-2)  # transformers' own edits assign keys/values directly
        layer.reorder_cache(torch.tensor([1, 0]))
    k, v = states(2, 1, 9)
    want, got = plain.update(k, v), growing.update(k, v)
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])


def test_rows_join_and_leave_a_batch_cache_right_aligned():
    cache, joining = growing_cache(2), growing_cache(2)
    old_k, old_v = states(2, 3, 1)
    new_k, new_v = states(1, 5, 2)
    for layer in cache.layers:
        layer.update(old_k, old_v)
    for layer in joining.layers:
        layer.update(new_k, new_v)
    kvcache.join(cache, joining, 5)
    layer = cache.layers[1]
    assert layer.keys.shape == (3, 3, 5, 8) and layer._kbuf.shape[-2] > 5  # spare columns for the next steps
    assert torch.equal(layer.keys[:2, :, :2], torch.zeros(2, 3, 2, 8))  # the old rows: left padding
    assert torch.equal(layer.keys[:2, :, 2:], old_k) and torch.equal(layer.values[2:], new_v)
    step_k, step_v = states(3, 1, 3)
    ptr = layer._kbuf.data_ptr()
    layer.update(step_k, step_v)
    assert layer._kbuf.data_ptr() == ptr and torch.equal(layer.keys[:, :, 5:], step_k)
    # the first row leaves; the two columns only it needed go
    kvcache.keep_rows(cache, torch.tensor([1, 2]), 2)
    assert torch.equal(cache.layers[0].keys, torch.cat([old_k[1:], new_k[:, :, 2:]]))  # no step written there
    layer = cache.layers[1]
    assert torch.equal(layer.keys, torch.cat([torch.cat([old_k[1:], new_k[:, :, 2:]]), step_k[1:]], dim=-2))
    assert torch.equal(layer.values[1], torch.cat([new_v[0, :, 2:], step_v[2]], dim=-2))
    assert layer._kbuf.shape[-2] > layer.get_seq_length()


def test_only_caches_of_growing_layers_are_batchable():
    assert kvcache.batchable(growing_cache(2))
    cache = growing_cache(2)
    cache.layers[1] = DynamicLayer()
    assert not kvcache.batchable(cache)


def test_the_pacer_sizes_a_chunk_to_its_share_of_a_decode_step():
    pacer = PrefillPacer(max_tokens=128, budget=0.5)
    assert pacer.next_tokens() == pacer.min_tokens == 8  # nothing timed yet: the smallest chunk
    pacer.decoded(0.060)
    pacer.prefilled(8, 0.016)  # 2 ms a token: half of a 60 ms step holds 15 tokens
    assert pacer.next_tokens() == 15
    pacer.prefilled(4, 0.100)  # 25 ms a token: no chunk fits, the smallest one still goes
    assert pacer.next_tokens() == 8
    pacer.prefilled(100, 0.001)
    assert pacer.next_tokens() == 128  # never more than the most a chunk takes
    pacer.max_tokens = 2
    assert pacer.next_tokens() == 2
    assert PrefillPacer(max_tokens=32, budget=0).next_tokens() == 32  # budget 0: fixed chunks
    with pytest.raises(ValueError):
        PrefillPacer(max_tokens=32, budget=-1)
    with pytest.raises(ValueError):
        PrefillPacer(max_tokens=0, budget=0.5)


def test_a_chunk_sharing_the_decode_step_is_paced_by_what_it_adds_to_the_step():
    pacer = PrefillPacer(max_tokens=128, budget=0.5)
    assert pacer.next_tokens(shared=True) == pacer.min_shared_tokens == 2  # no forward of its own to pay for
    pacer.decoded(0.060)  # the last plain decode step
    pacer.shared(8, 0.060 + 8 * 0.003)  # the step with 8 chunk tokens: 3 ms a token
    assert pacer.next_tokens(shared=True) == 10  # 30 ms of budget / 3 ms
    pacer.shared(10, 0.050)  # a step faster than the plain one (noise): nothing added ...
    assert pacer.next_tokens(shared=True) == 20  # ... the estimate halves (1.5 ms), the chunk at most doubles
    pacer.shared(20, 0.060 + 20 * 0.0045)  # 4.5 ms a token: the estimate is back to 3 ms
    assert pacer.next_tokens(shared=True) == 10
    pacer.shared(2, 0.060 + 0.100)  # 50 ms a token: the smallest shared chunk still goes
    assert pacer.next_tokens(shared=True) == 2 and pacer.next_tokens() == 8  # a forward of its own: 8
    fresh = PrefillPacer(max_tokens=128, budget=0.5)
    fresh.shared(8, 0.080)  # no plain decode step timed yet: nothing to subtract, smallest chunks
    assert fresh.next_tokens(shared=True) == 2
