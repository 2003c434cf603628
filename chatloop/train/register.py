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

The same two passes give the reply's **document likelihood**: the base model's log-likelihood per
reply token as the plain continuation of the user's text. Talk that the base model finds unlikely in
both framings keeps its gap (a DPO candidate's did) but loses document likelihood: as a plain
continuation it is a worse text than the base model's own replies. Both are the base model's
likelihoods, so a policy paid on them finds talk that passes them (RLOO did, with either hinge):
they check what a trainer did not optimise (docs/LOG.md 2026-12-05, evening).

Also owns ``unassuming_thumbs``: which thumbed replies KTO learns from when liked replies far more
assistant-like than the disliked ones are left out (``kto_register_margin``; off by default), and
the hinges RLOO's and PPO's rewards can carry (``FramingTerm``): a sampled reply loses
``register_coef`` x how far its gap rises above where the policy started and ``document_coef`` x how
far its document likelihood falls below where the policy started; nothing on the other side.

Invariants: always the *base* model's probabilities (as for relevance); the chat prompt is the
tokens the reply was sampled after; the plain prompt is cut from the left to the same budget;
empty replies are left out (None), not counted as zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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


def framing_logprobs(base_model, tokenizer, chat_prompts: Sequence[list[int]], plain_prompts: Sequence[list[int]],
                     replies: Sequence[list[int]], batch_size: int = 8) -> list[tuple[float, float] | None]:
    """Each reply's log-likelihood per token under ``base_model`` after its chat prompt and after its
    plain prompt, as (chat, plain) (None for an empty reply); ``base_model`` is the base model (a
    PeftModel inside ``disable_adapter()`` is)."""
    eos = tokenizer.eos_token_id
    keep = [i for i, r in enumerate(replies) if any(t != eos for t in r)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    chat = reply_logprobs(base_model, pad, [Encoded(list(chat_prompts[i]), list(replies[i])) for i in keep], batch_size)
    plain = reply_logprobs(base_model, pad, [Encoded(list(plain_prompts[i]), list(replies[i])) for i in keep],
                           batch_size)
    out: list[tuple[float, float] | None] = [None] * len(replies)
    for i, a, b in zip(keep, chat, plain):
        out[i] = (a / len(replies[i]), b / len(replies[i]))
    return out


def register_gap(base_model, tokenizer, chat_prompts: Sequence[list[int]], plain_prompts: Sequence[list[int]],
                 replies: Sequence[list[int]], batch_size: int = 8) -> list[float | None]:
    """Each reply's chat-over-plain log-likelihood per token under ``base_model`` (None for an
    empty reply); ``base_model`` is the base model (a PeftModel inside ``disable_adapter()`` is)."""
    return [None if f is None else f[0] - f[1]
            for f in framing_logprobs(base_model, tokenizer, chat_prompts, plain_prompts, replies, batch_size)]


def sampled_framing(policy, tokenizer, chat_prompts: Sequence[list[int]], plain_prompts: Sequence[list[int]],
                    replies: Sequence[list[int]], device, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The register gaps and document likelihoods (``framing_logprobs``) of
    replies the policy sampled, under the base model (the policy with its adapter disabled), as two
    tensors with NaN for an empty reply."""
    with policy.disable_adapter():
        framed = framing_logprobs(policy, tokenizer, chat_prompts, plain_prompts, replies, batch_size)
    nan = float("nan")
    register = torch.tensor([nan if f is None else f[0] - f[1] for f in framed], dtype=torch.float, device=device)
    document = torch.tensor([nan if f is None else f[1] for f in framed], dtype=torch.float, device=device)
    return register, document


def starting_mean(values: torch.Tensor) -> float | None:
    """Where the policy started: the mean of its first rollout's measured (non-empty) replies (a
    register gap or a document likelihood); None while none was measured (a rollout of empty replies
    leaves the start for the next one)."""
    measured = values[~values.isnan()]
    return float(measured.mean()) if measured.numel() else None


def register_penalty(register: torch.Tensor, floor: float, coef: float) -> torch.Tensor:
    """The hinge a policy-gradient reward adds: minus ``coef`` x how far each reply's register gap
    rises above ``floor``; nothing at or below it, nothing for an empty reply (NaN; the degenerate
    rule is what judges those)."""
    return -coef * (register - floor).clamp(min=0.0).nan_to_num(0.0)


def document_penalty(document: torch.Tensor, floor: float, coef: float) -> torch.Tensor:
    """Minus ``coef`` x how far each reply's document likelihood falls below ``floor``; nothing at or
    above it, nothing for an empty reply (NaN)."""
    return -coef * (floor - document).clamp(min=0.0).nan_to_num(0.0)


@dataclass
class FramingTerm:
    """The register and document hinges of one training run: each floor is where the policy
    started (the first measured rollout's mean), kept for the rest of the run; while no reply has
    been measured a floor stays None and its hinge takes nothing. A coefficient of 0 is off."""

    register_coef: float
    document_coef: float
    register_floor: float | None = None
    document_floor: float | None = None

    @property
    def on(self) -> bool:
        return bool(self.register_coef or self.document_coef)

    def __call__(self, policy, tokenizer, chat_prompts: Sequence[list[int]], plain_prompts: Sequence[list[int]],
                 replies: Sequence[list[int]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the hinges take from each sampled reply's reward, and the replies' register gaps and
        document likelihoods (``sampled_framing``)."""
        register, document = sampled_framing(policy, tokenizer, chat_prompts, plain_prompts, replies, device)
        if self.register_floor is None:
            self.register_floor = starting_mean(register)
        if self.document_floor is None:
            self.document_floor = starting_mean(document)
        penalty = torch.zeros_like(register)
        if self.register_coef and self.register_floor is not None:
            penalty = penalty + register_penalty(register, self.register_floor, self.register_coef)
        if self.document_coef and self.document_floor is not None:
            penalty = penalty + document_penalty(document, self.document_floor, self.document_coef)
        return penalty, register, document

    def logged(self, register: torch.Tensor, document: torch.Tensor) -> dict[str, float | None]:
        """What a training step logs of the two (means over the measured replies, and the floors)."""
        return {"mean_register": float(register.nanmean()), "register_floor": self.register_floor,
                "mean_document": float(document.nanmean()), "document_floor": self.document_floor}


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
