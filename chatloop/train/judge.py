"""How a candidate adapter behaves next to the reference, measured in the training child.

Owns: sampling replies from the candidate and the reference on the same held-out prompts (same
seed, the serving defaults' temperature and top-p), and the gate's behavioural measurements:
- the reward model's mean score of each side and the candidate's win rate (ties count half);
- KL to the base model: the mean per-token log-ratio log p_candidate - log p_base over the
  candidate's own sampled replies (the usual sample estimate);
- the share of degenerate replies on each side (empty, mostly repeated 3-grams, or echoing the prompt);
- mean reply length on each side (length gaming shows up here);
- task relevance: the base model's prompt-reply PMI per token of the candidate's, the reference's
  and the base model's replies (``chatloop.train.relevance``); off-topic drift shows up here;
- register: the base model's chat-over-plain-document likelihood per token of the candidate's and
  the base model's replies (``chatloop.train.register``); drift into assistant talk shows up here;
- document likelihood: the base model's log-likelihood per token of the same replies as the plain
  continuation of the user's text (the same passes); talk unlikely in both framings shows up here.

Invariants: prompts are held-out contexts the candidate never trained on (the snapshot's
``eval_prompts.jsonl``); nothing here decides anything (``chatloop.evaluate.gate`` does).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch

from chatloop.train.common import Encoded, collate, sample_replies
from chatloop.train.degenerate import is_degenerate
from chatloop.train.ppo import token_forward
from chatloop.train.register import framing_logprobs, plain_prompt_ids
from chatloop.train.relevance import pmi_per_token, summary

TEMPERATURE, TOP_P = 0.7, 0.9  # the serving defaults: judge what users would see


def _with_paired_difference(values: dict[str, list[float | None]]) -> dict[str, Any]:
    """Each side's summary, and the candidate minus the base on the same prompts (its standard
    error says how far the gate's sample can be trusted)."""
    out: dict[str, Any] = {s: summary(v) for s, v in values.items()}
    out["paired_difference"] = summary([c - b for c, b in zip(values["candidate"], values["base"])
                                        if c is not None and b is not None])
    return out


@torch.no_grad()
def kl_to_base(candidate, tokenizer, prompts: list[list[int]], replies: list[list[int]],
               batch_size: int = 8) -> float:
    """Mean per-token log p_candidate(y) - log p_base(y) over the candidate's replies ``y``."""
    device = next(candidate.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(prompts), batch_size):
        items = [Encoded(p, r) for p, r in zip(prompts[start:start + batch_size], replies[start:start + batch_size])
                 if r]
        if not items:
            continue
        batch = collate(items, tokenizer.pad_token_id).to(device)
        lp_c, _, _, mask = token_forward(candidate, None, batch)
        with candidate.disable_adapter():
            lp_b, _, _, _ = token_forward(candidate, None, batch)
        total += float(((lp_c - lp_b) * mask).sum())
        count += int(mask.sum())
    return total / max(count, 1)


def judge(candidate, reference, tokenizer, contexts: list[list[dict[str, str]]],
          reward_fn: Callable[[list[tuple[list[dict], str]]], list[float]] | None,
          max_prompt_tokens: int, max_new_tokens: int, seed: int = 12345,
          reference_is_base: bool | None = None) -> dict[str, Any]:
    """Measure ``candidate`` (a PeftModel) against ``reference`` (a model, or None for the base
    model under the candidate's adapter) on ``contexts``. ``reference_is_base`` (default: whether
    ``reference`` is None) says whether the reference's replies are the base model's; when not, the
    base model answers the same prompts too, as the anchor of the relevance figure."""
    if not contexts:
        return {"prompts": 0}
    enc = [list(tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"])[-max_prompt_tokens:] for c in contexts]
    eos = tokenizer.eos_token_id
    candidate.eval()
    replies: dict[str, list[list[int]]] = {}
    for side, model in (("candidate", candidate), ("reference", reference if reference is not None else candidate)):
        ctx = candidate.disable_adapter() if (side == "reference" and reference is None) else nullcontext()
        with ctx:
            replies[side] = sample_replies(model, tokenizer, enc, max_new_tokens, seed,
                                           temperature=TEMPERATURE, top_p=TOP_P, batch_size=16)
    if reference_is_base is None:
        reference_is_base = reference is None
    if reference_is_base:
        base_replies = replies["reference"]
    else:
        with candidate.disable_adapter():
            base_replies = sample_replies(candidate, tokenizer, enc, max_new_tokens, seed,
                                          temperature=TEMPERATURE, top_p=TOP_P, batch_size=16)
    with candidate.disable_adapter():  # relevance and register are always the base model's figures
        values = {s: pmi_per_token(candidate, tokenizer, enc, rs)
                  for s, rs in (("candidate", replies["candidate"]), ("reference", replies["reference"]))}
        values["base"] = (values["reference"] if reference_is_base
                          else pmi_per_token(candidate, tokenizer, enc, base_replies))
        plain = [plain_prompt_ids(tokenizer, c, max_prompt_tokens) for c in contexts]
        framed = {"candidate": framing_logprobs(candidate, tokenizer, enc, plain, replies["candidate"]),
                  "base": framing_logprobs(candidate, tokenizer, enc, plain, base_replies)}
    gaps = {s: [None if f is None else f[0] - f[1] for f in fs] for s, fs in framed.items()}
    document = {s: [None if f is None else f[1] for f in fs] for s, fs in framed.items()}
    n = len(contexts)
    out: dict[str, Any] = {
        "relevance": _with_paired_difference(values),
        "register": _with_paired_difference(gaps),
        "document": _with_paired_difference(document),
        "prompts": n,
        "kl_to_base": kl_to_base(candidate, tokenizer, enc, replies["candidate"]),
        "degenerate": {s: sum(is_degenerate(r, eos, p) for r, p in zip(rs, enc)) / n for s, rs in replies.items()},
        "mean_reply_tokens": {s: sum(len([t for t in r if t != eos]) for r in rs) / n for s, rs in replies.items()},
    }
    texts = {s: [tokenizer.decode(r, skip_special_tokens=True) for r in rs] for s, rs in replies.items()}
    out["examples"] = [{"prompt": contexts[i][-1]["content"][:200], "candidate": texts["candidate"][i][:300],
                        "reference": texts["reference"][i][:300]} for i in range(min(3, n))]
    if reward_fn is not None:
        scores = {s: reward_fn(list(zip(contexts, t))) for s, t in texts.items()}
        wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores["candidate"], scores["reference"]))
        out["reward"] = {"candidate": sum(scores["candidate"]) / n, "reference": sum(scores["reference"]) / n,
                         "win_rate": wins / n}
    return out
