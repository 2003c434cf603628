"""Row-invariant attention (chatloop/engine/attention.py): each row of a left-padded batch gets
exactly (bit for bit) what transformers' sdpa attention gives that row alone without padding, in
decode and in a prompt's prefill; layouts it cannot split fall back to sdpa's result."""

from __future__ import annotations

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from chatloop.engine.attention import row_invariant_attention


class _Attn(nn.Module):  # what sdpa_attention_forward reads from a model's attention module
    is_causal = True
    num_key_value_groups = 2


def _batch(seed: int, rows: int, q_len: int, kv_len: int, pads: list[int]):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, 4, q_len, 16, generator=g)
    k = torch.randn(rows, 2, kv_len, 16, generator=g)
    v = torch.randn(rows, 2, kv_len, 16, generator=g)
    mask = torch.ones(rows, 1, q_len, kv_len, dtype=torch.bool)
    for i, p in enumerate(pads):
        mask[i, :, :, :p] = False
    if q_len > 1:  # causal, as sdpa's mask for a prompt
        mask &= torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
    return q, k, v, mask


def test_decode_rows_equal_each_row_alone_on_its_own_keys():
    module, pads = _Attn(), [0, 5, 17, 2]
    for kv_len in (40, 64, 71):
        q, k, v, mask = _batch(kv_len, 4, 1, kv_len, pads)
        got, _ = row_invariant_attention(module, q, k, v, mask, scaling=0.25)
        for i, p in enumerate(pads):
            alone, _ = sdpa_attention_forward(module, q[i:i + 1], k[i:i + 1, :, p:].contiguous(),
                                              v[i:i + 1, :, p:].contiguous(), None, scaling=0.25)
            assert torch.equal(got[i:i + 1], alone), (kv_len, i)
        # and the same rows without a mask (no padding) equal each row alone too
        got, _ = row_invariant_attention(module, q, k, v, None, scaling=0.25)
        for i in range(4):
            alone, _ = sdpa_attention_forward(module, q[i:i + 1], k[i:i + 1], v[i:i + 1], None, scaling=0.25)
            assert torch.equal(got[i:i + 1], alone)


def test_prefill_rows_equal_each_prompt_alone_and_padded_queries_are_zero():
    module, pads = _Attn(), [0, 3, 6]
    q, k, v, mask = _batch(1, 3, 12, 12, pads)
    got, _ = row_invariant_attention(module, q, k, v, mask, scaling=0.25)
    for i, p in enumerate(pads):
        alone, _ = sdpa_attention_forward(module, q[i:i + 1, :, p:].contiguous(), k[i:i + 1, :, p:].contiguous(),
                                          v[i:i + 1, :, p:].contiguous(), None, scaling=0.25)
        assert torch.equal(got[i:i + 1, p:], alone)
        assert not got[i, :p].any()


def test_layouts_it_cannot_split_get_sdpas_result():
    module = _Attn()
    q, k, v, mask = _batch(2, 2, 1, 20, [0, 0])
    mask[1, :, :, 7] = False  # a hole: not one run of keys
    got, _ = row_invariant_attention(module, q, k, v, mask, scaling=0.25)
    want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)
    assert torch.equal(got, want)
    for rows, pads in ((2, [0, 2]), (1, [0])):  # several queries on cached keys (a prefill chunk)
        q, k, v, mask = _batch(3, rows, 4, 20, pads)
        got, _ = row_invariant_attention(module, q, k, v, mask, scaling=0.25)
        want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)
        assert torch.equal(got, want)
