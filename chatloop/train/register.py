"""The register of replies without a judge model: how much more the base model expects a reply as
an assistant's turn than as the continuation of the user's own text.

Owns: the register gap the judge reports and the gate can limit. For a reply ``y`` to a
conversation ``x`` it is, per reply token,

    (log p_base(y | x in the chat template) - log p_base(y | x's user text as a plain document)) / |y|,

the plain document being the user messages' text followed by a blank line, no template. A reply
that reads as a chat assistant's talk ("I'm glad you enjoyed the film! ...") is far likelier after
the template's assistant header than after the user's text; text that carries the user's text on
(a review continued, an answer in the document's own voice) much less so. Raters that like an
upbeat tone pay for such talk whatever the task asked (docs/LOG.md, 2026-12-05): the candidate's
gap against the base model's on the same prompts shows that drift, which neither KL (talk is a
mode the base already has) nor the prompt-reply relevance (talk that names the film fits its
prompt) sees.

Also owns ``unassuming_thumbs``: which thumbed replies KTO learns from when liked replies far more
assistant-like than the disliked ones are left out (``kto_register_margin``; off by default), and
the register hinge RLOO's and PPO's rewards can carry (``register_penalty``: a sampled reply loses
``coef`` x how far its gap rises above where the policy started; nothing below it).

Invariants: always the *base* model's probabilities (as for relevance); the chat prompt is the
tokens the reply was sampled after; the plain prompt is cut from the left to the same budget;
empty replies are left out (None), not counted as zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from chatloop.train.common import Encoded
from chatloop.train.relevance import reply_logprobs


def plain_prompt_ids(tokenizer, context: Sequence[dict[str, str]], max_tokens: int) -> list[int]:
    """The user messages' text as the start of a plain document (no chat template), cut from the
    left to ``max_tokens``."""
    text = "\n\n".join(m["content"] for m in context if m.get("role") == "user")
    ids = list(tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"])
    return ids[-max_tokens:] if max_tokens > 0 else ids


def register_gap(base_model, tokenizer, chat_prompts: Sequence[list[int]], plain_prompts: Sequence[list[int]],
                 replies: Sequence[list[int]], batch_size: int = 8) -> list[float | None]:
    """Each reply's chat-over-plain log-likelihood per token under ``base_model`` (None for an
    empty reply); ``base_model`` is the base model (a PeftModel inside ``disable_adapter()`` is)."""
    eos = tokenizer.eos_token_id
    keep = [i for i, r in enumerate(replies) if any(t != eos for t in r)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    chat = reply_logprobs(base_model, pad, [Encoded(list(chat_prompts[i]), list(replies[i])) for i in keep], batch_size)
    plain = reply_logprobs(base_model, pad, [Encoded(list(plain_prompts[i]), list(replies[i])) for i in keep],
                           batch_size)
    out: list[float | None] = [None] * len(replies)
    for i, a, b in zip(keep, chat, plain):
        out[i] = (a - b) / len(replies[i])
    return out


def sampled_register(policy, tokenizer, chat_prompts: Sequence[list[int]], plain_prompts: Sequence[list[int]],
                     replies: Sequence[list[int]], device, batch_size: int = 8) -> torch.Tensor:
    """``register_gap`` of replies the policy sampled, under the base model (the policy with its
    adapter disabled), as a tensor with NaN for an empty reply."""
    with policy.disable_adapter():
        gaps = register_gap(policy, tokenizer, chat_prompts, plain_prompts, replies, batch_size)
    return torch.tensor([float("nan") if g is None else g for g in gaps], dtype=torch.float, device=device)


def register_floor(register: torch.Tensor) -> float | None:
    """Where the policy started: the mean gap of its first rollout's measured (non-empty) replies;
    None while none was measured (a rollout of empty replies leaves the start for the next one)."""
    measured = register[~register.isnan()]
    return float(measured.mean()) if measured.numel() else None


def register_penalty(register: torch.Tensor, floor: float, coef: float) -> torch.Tensor:
    """The hinge a policy-gradient reward adds: minus ``coef`` x how far each reply's register gap
    rises above ``floor``; nothing at or below it, nothing for an empty reply (NaN; the degenerate
    rule is what judges those)."""
    return -coef * (register - floor).clamp(min=0.0).nan_to_num(0.0)


def register_term(policy, tokenizer, chat_prompts: Sequence[list[int]], plain_prompts: Sequence[list[int]],
                  replies: Sequence[list[int]], device, coef: float,
                  floor: float | None) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """What the hinge takes from each sampled reply's reward, the replies' gaps (``sampled_register``)
    and the floor: ``floor``, or where the policy starts (this batch's mean) when None; while no
    reply has been measured the floor stays None and nothing is taken."""
    register = sampled_register(policy, tokenizer, chat_prompts, plain_prompts, replies, device)
    floor = register_floor(register) if floor is None else floor
    if floor is None:
        return torch.zeros_like(register), register, None
    return register_penalty(register, floor, coef), register, floor


def unassuming_thumbs(values: Sequence[float | None], liked: Sequence[bool], margin: float,
                      threshold: float | None = None) -> tuple[list[bool], dict[str, Any]]:
    """Which thumbed replies to learn from, given each one's register gap (``values``) and thumb
    (``liked``): every disliked one, and the liked ones at most ``margin`` above the median gap of
    the disliked ones (or at most ``threshold`` when given: a held-out list uses its training
    list's). The disliked replies are the base model's behaviour that raters did not pay for; a
    liked reply far more assistant-like than them is what a rater who likes an upbeat tone pays
    for whatever the task. Unmeasured (empty) replies are kept; without disliked ones all are."""
    down = sorted(v for v, up in zip(values, liked) if not up and v is not None)
    median = (down[(len(down) - 1) // 2] + down[len(down) // 2]) / 2 if down else None
    if threshold is None:
        threshold = median + margin if median is not None else None
    keep = [not up or v is None or threshold is None or v <= threshold for v, up in zip(values, liked)]
    return keep, {"thumbs": len(values), "liked": sum(liked), "liked_kept": sum(k for k, up in zip(keep, liked) if up),
                  "disliked_median": median, "threshold": threshold}
