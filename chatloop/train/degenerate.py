"""Which replies are degenerate: the gate counts them, and the policy-gradient trainers' rewards
can pay for them (``degenerate_penalty`` settings, off by default: docs/LOG.md 2026-12-05).

Owns: ``is_degenerate`` (empty, mostly repeated 3-grams, or echoing the prompt) and
``degenerate_penalty``, the reward term RLOO and PPO subtract for such a sampled reply.

Invariants: token ids only (no decoding); one rule for the gate's judgement and for the
trainers' rewards, so a policy is never paid for what the gate rejects it for.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

ECHO_TOKENS = 8  # a reply holding this many consecutive tokens of its prompt echoes it


def is_degenerate(tokens: Sequence[int], eos_id: int | None, prompt: Sequence[int] = ()) -> bool:
    """Empty; or (8+ tokens) fewer than half of its 3-grams distinct; or echoing its ``prompt``:
    ``ECHO_TOKENS`` consecutive tokens of it verbatim (a policy paid for relevance learned to copy
    the review opening it was asked to continue, docs/LOG.md 2026-12-04, late)."""
    body = [t for t in tokens if t != eos_id]
    if not body:
        return True
    if len(body) >= 8:
        grams = [tuple(body[i:i + 3]) for i in range(len(body) - 2)]
        if len(set(grams)) / len(grams) < 0.5:
            return True
    n = ECHO_TOKENS
    if len(body) >= n and len(prompt) >= n:
        quoted = {tuple(prompt[i:i + n]) for i in range(len(prompt) - n + 1)}
        return any(tuple(body[i:i + n]) in quoted for i in range(len(body) - n + 1))
    return False


def degenerate_penalty(prompts: Sequence[Sequence[int]], replies: Sequence[Sequence[int]], eos_id: int | None,
                       coef: float, device=None) -> tuple[torch.Tensor, float]:
    """``-coef`` for each degenerate reply (to its own prompt), 0 for the others; and their share."""
    flags = torch.tensor([is_degenerate(r, eos_id, p) for p, r in zip(prompts, replies)], dtype=torch.float,
                         device=device)
    return -coef * flags, float(flags.mean()) if len(flags) else 0.0
