"""Next-token choice for a whole batch at once, each row with its own settings.

Owns: repetition penalty, temperature, top-k and top-p filtering, greedy choice and seeded
sampling for the rows of one decode step.

Invariants:
- The math is transformers' logits-processor chain (``RepetitionPenaltyLogitsProcessor`` then
  ``TemperatureLogitsWarper`` -> ``TopKLogitsWarper`` -> ``TopPLogitsWarper``): greedy rows pick
  the argmax of the penalized logits, and a sampled row's distribution keeps exactly the tokens
  those warpers keep, with the same probabilities (tests compare against them).
- Top-p runs on the top-k candidates only (sorted by ``torch.topk``), not on a sort of the
  whole vocabulary: the kept set is the same because every token outside the top k already has
  probability zero, and it is what makes batched sampling cheap on a CPU.
- Each sampled row draws from its own ``torch.Generator``, so a seeded request reproduces its
  reply whatever else shares the batch.
- Any accepted setting gives a valid distribution: logits are shifted by their row maximum
  before the temperature divides them (softmax and the top-k order do not change, but nothing
  overflows), and a temperature below ``GREEDY_BELOW`` is greedy (its distribution is the argmax
  to float precision; smaller ones would underflow to 0 in float32). A row whose logits are not
  finite raises ``SamplingError`` naming only that row, so a caller can fail it alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

GREEDY_BELOW = 1e-4  # temperatures below this sample the argmax


class SamplingError(ValueError):
    """One row's logits gave no valid distribution (NaN or inf); ``row`` is its index."""

    def __init__(self, row: int, message: str):
        super().__init__(message)
        self.row = row


@dataclass(frozen=True)
class RowSampling:
    """One row's settings (a view of ``GenerationParams`` without the stop/length fields)."""

    temperature: float  # 0 = greedy
    top_k: int  # 0 = no top-k
    top_p: float  # 1 = no top-p
    repetition_penalty: float  # 1 = none


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> None:
    """In place on one row: tokens in ``seen`` get their logit divided (if > 0) or multiplied
    (if < 0) by ``penalty``, as in CTRL and transformers."""
    if penalty == 1.0 or seen.numel() == 0:
        return
    score = logits.gather(0, seen)
    logits.scatter_(0, seen, torch.where(score < 0, score * penalty, score / penalty))


def filtered_distribution(logits: torch.Tensor, rows: Sequence[RowSampling]) -> tuple[torch.Tensor, torch.Tensor]:
    """For sampled rows: (probs [B, K], token ids [B, K]) over each row's top-k/top-p candidates.

    ``logits`` is [B, V] (already penalized); K is the largest top_k among the rows (the whole
    vocabulary if one row has none); entries a row does not keep have probability 0.
    """
    vocab = logits.shape[-1]
    ks = [r.top_k if 0 < r.top_k < vocab else vocab for r in rows]
    k_max = max(ks)
    temps = logits.new_tensor([r.temperature for r in rows]).unsqueeze(1)
    shifted = logits - logits.max(dim=-1, keepdim=True).values  # <= 0, so / temps cannot overflow
    values, index = torch.topk(shifted / temps, k_max, dim=-1, sorted=True)
    positions = torch.arange(k_max, device=logits.device).unsqueeze(0)
    values = values.masked_fill(positions >= logits.new_tensor(ks).unsqueeze(1), float("-inf"))
    probs = torch.softmax(values, dim=-1)
    # top-p: drop a token when the tokens above it already hold top_p of the mass
    top_p = logits.new_tensor([r.top_p for r in rows]).unsqueeze(1)
    above = probs.cumsum(dim=-1) - probs
    drop = (above >= top_p) & (top_p < 1.0)
    drop[:, 0] = False  # the most likely token always stays
    probs = probs.masked_fill(drop, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True), index


def choose_tokens(logits: torch.Tensor, rows: Sequence[RowSampling], seen: Sequence[torch.Tensor],
                  generators: Sequence[torch.Generator]) -> list[int]:
    """The next token of every row: ``logits`` [B, V] float (left unchanged), ``seen[i]`` the
    token ids row i has so far (prompt and reply), ``generators[i]`` its RNG."""
    logits = logits.clone()  # the penalty works in place; a caller may retry rows one by one
    for i, r in enumerate(rows):
        apply_repetition_penalty(logits[i], seen[i], r.repetition_penalty)
    finite = torch.isfinite(logits).all(dim=-1).tolist()
    if not all(finite):
        bad = finite.index(False)
        raise SamplingError(bad, f"the model's logits for row {bad} are not finite")
    out = [0] * len(rows)
    greedy = [i for i, r in enumerate(rows) if r.temperature < GREEDY_BELOW]
    if greedy:
        picks = logits[greedy].argmax(dim=-1).tolist()
        for i, t in zip(greedy, picks):
            out[i] = int(t)
    sampled = [i for i, r in enumerate(rows) if r.temperature >= GREEDY_BELOW]
    if sampled:
        probs, index = filtered_distribution(logits[sampled], [rows[i] for i in sampled])
        for j, i in enumerate(sampled):
            pick = torch.multinomial(probs[j], 1, generator=generators[i])
            out[i] = int(index[j, pick])
    return out
