"""Task relevance of replies without a judge model: how much a reply depends on its own prompt.

Owns: the relevance figure the gate reads. For a reply ``y`` to prompt ``x`` it is the base
model's pointwise mutual information per reply token,

    (log p_base(y | x) - log p_base(y | x')) / |y|,

where ``x'`` is *another* held-out prompt (the next one, in order; the empty user message when
there is only one). A reply that answers its prompt is likelier after that prompt than after a
different one; a reply that would fit any prompt (assistant talk about the task, a stock phrase,
an off-topic story) scores near zero whatever its oracle score. The mismatched prompt is a better
"no information" reference than an empty one: it keeps the task's framing (e.g. "continue this
review"), so text about the framing alone earns nothing.

Invariants: always the *base* model's probabilities (the candidate's own would reward the drift
it learned); the same (prompt, reply) tokens as training sees them (``common.encode_reply`` for
text, sampled token ids as they are); empty replies are left out, not counted as zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from chatloop.train.common import Encoded, collate, encode_reply


@torch.no_grad()
def reply_logprobs(model, pad_id: int, items: Sequence[Encoded], batch_size: int = 8) -> list[float]:
    """Summed log-probability of each item's reply tokens given its prompt, under ``model``."""
    from chatloop.train.ppo import token_forward

    device = next(model.parameters()).device
    out: list[float] = []
    for start in range(0, len(items), batch_size):
        chunk = list(items[start:start + batch_size])
        lp, _, _, mask = token_forward(model, None, collate(chunk, pad_id).to(device))
        out.extend(float(v) for v in (lp * mask).sum(dim=1))
    return out


def mismatched(prompts: Sequence[list[int]], empty_prompt: list[int]) -> list[list[int]]:
    """The prompt each reply is compared against: the next prompt in order that differs from its
    own (wrapping round; several replies to one prompt sit together in a snapshot), or
    ``empty_prompt`` when every prompt is the same."""
    n = len(prompts)
    out = []
    for i in range(n):
        other = next((prompts[(i + k) % n] for k in range(1, n) if prompts[(i + k) % n] != prompts[i]), None)
        out.append(other if other is not None else empty_prompt)
    return out


def empty_prompt_ids(tokenizer) -> list[int]:
    return list(tokenizer.apply_chat_template([{"role": "user", "content": ""}], add_generation_prompt=True,
                                              tokenize=True, return_dict=True)["input_ids"])


def pmi_per_token(base_model, tokenizer, prompts: Sequence[list[int]], replies: Sequence[list[int]],
                  batch_size: int = 8, on_batch: Callable[[int, int], None] | None = None) -> list[float | None]:
    """Each reply's PMI with its own prompt per token (None for an empty reply); ``base_model``
    is the base model (a PeftModel inside ``disable_adapter()`` is). ``on_batch(done, total)`` is
    called after every ``batch_size`` replies (progress)."""
    others = mismatched(list(prompts), empty_prompt_ids(tokenizer))  # from the whole list, not per batch
    out: list[float | None] = []
    for start in range(0, len(replies), batch_size):
        part = slice(start, start + batch_size)
        out.extend(_pmi(base_model, tokenizer, prompts[part], others[part], replies[part], batch_size))
        if on_batch is not None:
            on_batch(min(start + batch_size, len(replies)), len(replies))
    return out


def _pmi(base_model, tokenizer, prompts: Sequence[list[int]], others: Sequence[list[int]],
         replies: Sequence[list[int]], batch_size: int) -> list[float | None]:
    eos = tokenizer.eos_token_id
    keep = [i for i, r in enumerate(replies) if any(t != eos for t in r)]
    own = reply_logprobs(base_model, tokenizer.pad_token_id, [Encoded(list(prompts[i]), list(replies[i])) for i in keep],
                         batch_size)
    other = reply_logprobs(base_model, tokenizer.pad_token_id, [Encoded(list(others[i]), list(replies[i]))
                                                                for i in keep], batch_size)
    out: list[float | None] = [None] * len(replies)
    for i, a, b in zip(keep, own, other):
        out[i] = (a - b) / len(replies[i])
    return out


def summary(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and standard error of the measured values (empty replies left out)."""
    xs = [v for v in values if v is not None]
    n = len(xs)
    if not n:
        return {"mean": None, "se": None, "replies": 0}
    mean = sum(xs) / n
    var = sum((x - mean) ** 2 for x in xs) / max(n - 1, 1)
    return {"mean": mean, "se": math.sqrt(var / n), "replies": n}


def pmi_of_texts(base_model, tokenizer, contexts: Sequence[Sequence[dict[str, str]]], texts: Sequence[str],
                 max_prompt_tokens: int = 384, max_reply_tokens: int = 256, batch_size: int = 8,
                 on_batch: Callable[[int, int], None] | None = None) -> list[float | None]:
    """Each logged or stored reply's (text) PMI with its context per token (None for an empty one).
    ``on_batch(done, total)`` is called after every ``batch_size`` replies (progress)."""
    enc = [encode_reply(tokenizer, c, t, max_prompt_tokens, max_reply_tokens) for c, t in zip(contexts, texts)]
    eos = tokenizer.eos_token_id
    replies = [e.reply_ids if t.strip() else [eos] for e, t in zip(enc, texts)]
    return pmi_per_token(base_model, tokenizer, [e.prompt_ids for e in enc], replies, batch_size, on_batch)


def relevance_of_texts(base_model, tokenizer, contexts: Sequence[Sequence[dict[str, str]]], texts: Sequence[str],
                       max_prompt_tokens: int = 384, max_reply_tokens: int = 256) -> dict[str, Any]:
    """The relevance summary of logged or stored replies (text) to their contexts."""
    return summary(pmi_of_texts(base_model, tokenizer, contexts, texts, max_prompt_tokens, max_reply_tokens))


def per_token_pmi(own_lp: torch.Tensor, other_lp: torch.Tensor, mask: torch.Tensor,
                  empty: torch.Tensor) -> torch.Tensor:
    """Each row's PMI per reply token from (B, R) per-token log-probs after its own prompt and after
    the mismatched one (``mask`` marks reply tokens); 0 where ``empty`` (a reply of EOS only)."""
    pmi = ((own_lp - other_lp) * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return pmi.masked_fill(empty, 0.0)


def relevance_penalty(relevance: torch.Tensor, floor: float, coef: float) -> torch.Tensor:
    """The hinge a policy-gradient reward adds: ``coef`` x how far each reply's relevance falls below
    ``floor`` (where the policy started), nothing above it. Rewarded without a ceiling, RLOO learned
    to copy its prompt (docs/LOG.md 2026-12-04, late)."""
    return coef * (relevance - floor).clamp(max=0.0)


def relevant_pairs(values: Sequence[float | None], min_share: float,
                   threshold: float | None = None) -> tuple[list[bool], dict[str, Any]]:
    """Which preference pairs to learn from, given each pair's chosen reply's PMI per token
    (``values``): those at least ``min_share`` x the median of ``values`` (or at least
    ``threshold`` when given: a held-out list uses its training list's). A pair whose chosen reply
    would fit any prompt teaches that raters like generic talk, which is how a rater is gamed
    (docs/LOG.md 2026-12-04). Empty chosen replies are kept (nothing to measure); when no pair
    would be left, all are kept and the summary says so."""
    xs = sorted(v for v in values if v is not None)
    median = (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2 if xs else None
    if threshold is None:
        threshold = min_share * max(median, 0.0) if median is not None else None
    keep = [v is None or threshold is None or v >= threshold for v in values]
    out = {"pairs": len(values), "kept": sum(keep), "median": median, "threshold": threshold}
    if values and not any(keep):
        keep = [True] * len(values)
        out.update(kept=len(values), note="every chosen reply was below the threshold: all kept")
    return keep, out
