"""Row-invariant attention for the serving engine: a row's attention output does not depend on
which other rows share its forward pass, or on the left padding they force on it.

Owns: ``ROW_INVARIANT`` (an attention implementation registered with transformers'
``AttentionInterface``, its masks built as ``sdpa``'s) and ``use_row_invariant_attention``.

Why: torch's CPU attention kernel is not batch-invariant (a row's output differs in the last bits
with the batch size it runs in, and with a padding mask transformers also takes another
grouped-query path), so a row decoded in a batch is not bit-equal to the same row decoded alone.
In fp32 that rarely changes a greedy token; where the matmuls take bf16 inputs (the packed
serving formats) those last bits can cross a bf16 rounding step, move a logit by one bf16 step and
flip a tie (docs/LOG.md 2026-12-05). So each row runs transformers' own ``sdpa`` attention alone,
on its unpadded keys and values without a mask: the very call an unbatched ``generate`` makes.

Invariants:
- A batch of one without a mask goes straight to ``sdpa``, as does any layout this cannot split
  exactly (keys that are not one contiguous run per row, or several query positions on top of
  cached keys: a chunked prefill, one row); those keep ``sdpa``'s numbers.
- Padded query positions (a left-padded prompt's leading pad) get zeros; nothing attends to them.
- Only the engine's model is switched (its config); training and references keep ``sdpa``.
- While a ragged step (ragged.py) runs on the calling thread, its own ``attend`` does the work.
"""

from __future__ import annotations

import threading
import weakref

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

ROW_INVARIANT = "chatloop_row_invariant"

_ragged = threading.local()  # .step: the ragged step (ragged.py) whose forward runs on this thread


def set_ragged_step(step) -> None:
    """While set, this thread's forwards are ``step``'s: its own ``attend`` does the attention."""
    _ragged.step = step


_starts_memo: tuple[weakref.ref | None, list[int] | None] = (None, None)  # one forward's mask: every layer reads it


def _first_key(mask: torch.Tensor) -> list[int] | None:
    """Each row's first attended key when every row attends one contiguous run of keys that ends
    at the last one (left padding), judged on the last query position; None otherwise."""
    global _starts_memo
    ref, starts = _starts_memo
    if ref is not None and ref() is mask:
        return starts
    last = mask[:, 0, -1, :]  # (B, kv) bool: True = attend
    if last.dtype != torch.bool:
        last = last == 0  # an additive float mask: 0 attends, -inf does not
    n = last.shape[1]
    first = n - last.sum(dim=1)
    run = torch.arange(n, device=last.device)[None, :] >= first[:, None]
    starts = first.tolist() if bool((run == last).all()) and int(first.max()) < n else None
    _starts_memo = (weakref.ref(mask), starts)
    return starts


def _decode_row(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                scaling: float | None) -> torch.Tensor:
    """One row's decode attention, as ``sdpa_attention_forward`` computes it for one query position
    with no mask on a CPU (its grouped-query path, no causal flag), without its per-call checks."""
    groups = getattr(module, "num_key_value_groups", 1) > 1
    out = F.scaled_dot_product_attention(query, key, value, scale=scaling, **({"enable_gqa": True} if groups else {}))
    return out.transpose(1, 2)


def row_invariant_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    """``sdpa_attention_forward``'s result, computed one row at a time on each row's own keys."""
    step = getattr(_ragged, "step", None)
    if step is not None:  # decode rows and a prompt's chunk in one forward
        return step.attend(module, query, key, value, **kwargs), None
    batch, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    if batch == 1 and attention_mask is None:
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)
    if attention_mask is None:
        starts = [0] * batch
    elif attention_mask.dim() == 4:
        starts = _first_key(attention_mask)
    else:
        starts = None
    if starts is None or (q_len > 1 and kv_len != q_len):  # a chunk of a prompt on its cached part
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    out = query.new_zeros(batch, q_len, query.shape[1], value.shape[-1])
    direct = q_len == 1 and key.device.type == "cpu" and key.shape[-1] == value.shape[-1] <= 256 \
        and not kwargs.get("dropout") and kwargs.get("position_bias") is None
    for i, start in enumerate(starts):
        if direct:
            out[i:i + 1] = _decode_row(module, query[i:i + 1], key[i:i + 1, :, start:], value[i:i + 1, :, start:],
                                       kwargs.get("scaling"))
            continue
        # a prompt's padded queries sit before its first key
        q_from = start if q_len == kv_len else 0
        row, _ = sdpa_attention_forward(module, query[i:i + 1, :, q_from:], key[i:i + 1, :, start:],
                                        value[i:i + 1, :, start:], None, **kwargs)
        out[i:i + 1, q_from:] = row
    return out, None


def use_row_invariant_attention(model, on: bool = True) -> None:
    """Register the implementation (once) and switch ``model`` (a PreTrainedModel or a PEFT
    wrapper of one) to it, or back to ``sdpa`` (``on`` False: benchmarks compare the two)."""
    AttentionInterface.register(ROW_INVARIANT, row_invariant_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ROW_INVARIANT, sdpa_mask)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(ROW_INVARIANT if on else "sdpa")
