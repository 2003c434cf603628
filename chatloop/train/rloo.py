"""RLOO: critic-free policy gradient with a reward model, on a LoRA adapter (Ahmadian et al. 2024,
"Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback in LLMs",
as TRL's ``RLOOTrainer`` implements it).

Owns: the RLOO math (sequence-level KL-penalised rewards, the leave-one-out baseline, the clipped
sequence-level objective) and its rollout/optimisation loop.

Per step:
1. ``prompts_per_step`` logged prompts, each answered ``k`` times by the policy in one batched
   ``generate`` (row ``p * k + j`` is reply ``j`` to prompt ``p``, TRL's layout);
2. the reward model scores every (prompt, reply) once; optionally shaped: minus ``relevance_coef``
   times how far the reply's relevance falls below the first step's mean, minus ``register_coef``
   times how far its register gap (``register.py``: assistant talk against the task's own text)
   rises above the first step's mean, minus ``document_coef`` times how far its document
   likelihood (``register.py``) falls below the first step's mean, minus ``degenerate_penalty`` for a degenerate reply
   (``degenerate.py``: what the gate counts);
3. reward = score - beta * sum_t (log pi_old(y_t) - log ref(y_t)) (the first-order KL estimate
   summed over the reply, as TRL's RLOO: a reward penalty, not a loss term);
4. advantage = reward - the mean reward of the *other* k - 1 replies to the same prompt (this
   baseline replaces PPO's value head); optionally normalised over the batch;
5. ``epochs`` passes of minibatches minimising -min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A)
   with ratio = exp(log pi(y) - log pi_old(y)) over the whole reply, averaged over replies.

Every forward pass (old policy, reference, each minibatch) runs a prompt once for its k replies
(``common.PromptGroups``: on a CPU the replies continue from the prompt's cache), so a minibatch
holds whole prompts' replies.

Invariants: the reference is frozen (the active adapter); log-probs cover reply tokens only and
padding never counts; every step logs what moves (mean score, KL, entropy, gradient norm,
advantage spread, replies seen) so a run that does not learn says why.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from chatloop.train.common import Encoded, collate_groups, grouped_token_logprobs, sample_replies
from chatloop.train.degenerate import degenerate_penalty
from chatloop.train.ppo import masked_mean
from chatloop.train.register import FramingTerm, plain_prompt_ids
from chatloop.train.relevance import relevance_penalty


# ---- the math ------------------------------------------------------------------------------------
def rloo_advantages(scores: torch.Tensor, seq_kl: torch.Tensor, k: int, beta: float,
                    normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Leave-one-out advantages of ``scores`` (P*k, grouped k consecutive rows per prompt) after
    the sequence KL penalty; returns (advantages, penalised rewards)."""
    if k < 2:
        raise ValueError("RLOO needs at least 2 replies per prompt for its leave-one-out baseline")
    rewards = scores - beta * seq_kl
    grouped = rewards.view(-1, k)
    baselines = (grouped.sum(dim=1, keepdim=True) - grouped) / (k - 1)
    adv = (grouped - baselines).reshape(-1)
    if normalize:
        adv = (adv - adv.mean()) / (adv.std() + 1e-4)
    return adv, rewards


def rloo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, epsilon: float,
              epsilon_high: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped sequence-level objective (mean over replies) and the share of clipped replies."""
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + (epsilon if epsilon_high is None else epsilon_high))
    loss = -torch.min(ratio * advantages, clipped * advantages).mean()
    frac = ((ratio * advantages) > (clipped * advantages)).float().mean()
    return loss, frac


# ---- the loop ------------------------------------------------------------------------------------
@dataclass
class RlooConfig:
    learning_rate: float = 1e-4
    prompts_per_step: int = 8
    k: int = 4  # replies per prompt
    steps: int = 12  # rollout batches per cycle: steps * prompts_per_step * k replies in all
    epochs: int = 1  # optimisation passes over each rollout batch (TRL's num_iterations)
    minibatch_size: int = 16  # replies per optimiser step, in whole prompts' k replies (at least one prompt)
    max_new_tokens: int = 48
    max_prompt_tokens: int = 384
    temperature: float = 1.0
    beta: float = 0.05
    epsilon: float = 0.2
    epsilon_high: float | None = None
    normalize_advantages: bool = False
    max_grad_norm: float = 1.0
    # minus this times how far each reply's task relevance (nats/token, chatloop/train/relevance.py) falls
    # below the first step's mean (where the policy started), in its reward; relevance above that earns
    # nothing: rewarded without a ceiling, RLOO learned to copy its prompt (docs/LOG.md 2026-12-04, late)
    relevance_coef: float = 0.0
    # minus this for a degenerate sampled reply (empty, repetitive or echoing its prompt: degenerate.py),
    # what the gate rejects a candidate for having more of than its reference
    degenerate_penalty: float = 0.0
    # minus this times how far each reply's register gap (nats/token, chatloop/train/register.py) rises
    # above the first step's mean: the raters' taste for upbeat assistant talk whatever the task asked
    register_coef: float = 0.0
    # minus this times how far each reply's document likelihood (the base model's log-likelihood per token
    # of the reply as the plain continuation of the user's text, register.py) falls below the first step's
    # mean: talk the base model finds unlikely in both framings games the register gap, not this
    document_coef: float = 0.0
    seed: int = 0


def _group_logps(model, prompt_ids: list[list[int]], replies: list[list[int]], k: int, pad_id: int,
                 temperature: float, device, ctx=None):
    """Per-token log-probs, entropies and mask of replies laid out as RLOO rows (row ``p * k + j`` is
    reply ``j`` to ``prompt_ids[p]``), each prompt run once for its k replies (``PromptGroups``)."""
    groups = [[Encoded(p, replies[q * k + j]) for j in range(k)] for q, p in enumerate(prompt_ids)]
    n = len(prompt_ids)
    order = torch.tensor([j * n + q for q in range(n) for j in range(k)], device=device)  # group row -> RLOO row
    with ctx or nullcontext():
        lp, ent, mask = grouped_token_logprobs(model, collate_groups(groups, pad_id).to(device), temperature)
    return lp[order], ent[order], mask[order]


def _relevance(policy, base_lp: torch.Tensor | None, prompt_ids: list[list[int]], replies: list[list[int]],
               mask: torch.Tensor, tokenizer, k: int, device) -> torch.Tensor:
    """Each reply's task relevance (``relevance.py``: the base model's PMI of reply and prompt per
    token, against another prompt of the step; the base is the policy under ``disable_adapter``),
    given the base's log-probs after the replies' own prompts when already computed; 0 for an
    empty reply."""
    from chatloop.train.relevance import empty_prompt_ids, mismatched, per_token_pmi

    def base(prompts: list[list[int]]) -> torch.Tensor:
        return _group_logps(policy, prompts, replies, k, tokenizer.pad_token_id, 1.0, device,
                            policy.disable_adapter())[0]

    own = base(prompt_ids) if base_lp is None else base_lp
    other_lp = base(mismatched(prompt_ids, empty_prompt_ids(tokenizer)))
    empty = torch.tensor([all(t == tokenizer.eos_token_id for t in r) for r in replies], device=device)
    return per_token_pmi(own, other_lp, mask, empty)


def train_rloo(
    policy: torch.nn.Module,
    reference: torch.nn.Module | None,
    tokenizer,
    prompts: Sequence[list[dict]],
    reward_fn: Callable[[list[tuple[list[dict], str]]], list[float]],
    cfg: RlooConfig,
    on_step: Callable[[dict], None] = lambda m: None,
    should_stop: Callable[[], bool] = lambda: False,
) -> dict:
    """Optimise the policy's trainable (LoRA) parameters with RLOO against ``reward_fn``.
    ``reference`` None means the base model under the policy's adapter (``disable_adapter``)."""
    if not prompts:
        raise ValueError("RLOO needs logged prompts to roll out on")
    device = next(policy.parameters()).device
    torch.manual_seed(cfg.seed)
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    encoded = [list(tokenizer.apply_chat_template(list(p), add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"])[-cfg.max_prompt_tokens:]
               for p in prompts]
    framing = FramingTerm(cfg.register_coef, cfg.document_coef)  # the register and document hinges
    plain = [plain_prompt_ids(tokenizer, p, cfg.max_prompt_tokens) for p in prompts] if framing.on else []
    gen = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    history: list[dict] = []
    t0 = time.perf_counter()
    seen = 0
    floor: float | None = None  # the relevance the policy started at (first step's mean)
    for step in range(cfg.steps):
        if should_stop():
            raise InterruptedError("training cancelled")
        while len(order) < cfg.prompts_per_step:  # every prompt once before any twice
            order += torch.randperm(len(prompts), generator=gen).tolist()
        pick, order = order[: cfg.prompts_per_step], order[cfg.prompts_per_step:]
        rows = [i for i in pick for _ in range(cfg.k)]
        policy.eval()
        t_roll = time.perf_counter()
        replies = sample_replies(policy, tokenizer, [encoded[i] for i in rows], cfg.max_new_tokens,
                                 cfg.seed * 1000 + step, temperature=cfg.temperature, batch_size=len(rows))
        texts = [tokenizer.decode(y, skip_special_tokens=True) for y in replies]
        scores = torch.tensor(reward_fn([(list(prompts[i]), t) for i, t in zip(rows, texts)]),
                              dtype=torch.float, device=device)
        prompt_ids = [encoded[i] for i in pick]
        pad = tokenizer.pad_token_id

        def logps(model, q: list[int], ctx=None):  # the replies of prompts q (positions in pick)
            return _group_logps(model, [prompt_ids[i] for i in q], [replies[i * cfg.k + j] for i in q for j in range(cfg.k)],
                                cfg.k, pad, cfg.temperature, device, ctx)

        everyone = list(range(len(pick)))
        with torch.no_grad():
            old_lp, _, mask = logps(policy, everyone)
            if reference is None:
                ref_lp, _, _ = logps(policy, everyone, policy.disable_adapter())
            else:
                ref_lp, _, _ = logps(reference, everyone)
            seq_kl = ((old_lp - ref_lp) * mask).sum(dim=1)
            reward_scores = scores  # the reward model's (logged), before the shaping terms
            relevance, degenerate, register, document = None, None, None, None
            if cfg.degenerate_penalty:
                penalty, degenerate = degenerate_penalty([encoded[i] for i in rows], replies, tokenizer.eos_token_id,
                                                         cfg.degenerate_penalty, device)
                scores = scores + penalty
            if framing.on:
                penalty, register, document = framing(
                    policy, tokenizer, [encoded[i] for i in rows], [plain[i] for i in rows], replies, device)
                scores = scores + penalty
            if cfg.relevance_coef:
                reusable = reference is None and cfg.temperature == 1.0  # the reference pass was the base's at T = 1
                relevance = _relevance(policy, ref_lp if reusable else None, prompt_ids, replies, mask, tokenizer,
                                       cfg.k, device)
                if floor is None:
                    floor = float(relevance.mean())
                scores = scores + relevance_penalty(relevance, floor, cfg.relevance_coef)
            adv, rewards = rloo_advantages(scores, seq_kl, cfg.k, cfg.beta, cfg.normalize_advantages)
        old_seq = (old_lp * mask).sum(dim=1)
        rollout_s = time.perf_counter() - t_roll
        stats = []  # the policy stays in eval mode: no dropout, as TRL's disable_dropout
        per_minibatch = max(1, cfg.minibatch_size // cfg.k)  # whole prompts: each is run once for its k replies
        for _ in range(cfg.epochs):
            perm = torch.randperm(len(pick), generator=gen).tolist()
            for s in range(0, len(pick), per_minibatch):
                q = perm[s:s + per_minibatch]
                idx = [i * cfg.k + j for i in q for j in range(cfg.k)]
                lp, ent, m = logps(policy, q)
                loss, frac = rloo_loss((lp * m).sum(dim=1), old_seq[idx], adv[idx], cfg.epsilon, cfg.epsilon_high)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
                stats.append({"loss": float(loss.detach()), "clip_fraction": float(frac),
                              "entropy": float(masked_mean(ent.detach(), m)), "grad_norm": float(grad_norm)})
        seen += len(rows)
        mean = {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}
        grouped = reward_scores.view(-1, cfg.k)
        shaping = ({"mean_relevance": float(relevance.mean()), "relevance_floor": floor} if relevance is not None else {})
        if register is not None:
            shaping.update(framing.logged(register, document))
        if relevance is not None or degenerate is not None or register is not None:
            shaping["mean_shaped_reward"] = float(scores.mean())
        if degenerate is not None:
            shaping["degenerate_share"] = degenerate
        m_out = {"step": step + 1, "total": cfg.steps, **mean, "mean_reward": float(reward_scores.mean()), **shaping,
                 "kl": float(((old_lp - ref_lp) * mask).sum() / mask.sum().clamp(min=1)),
                 "penalised_reward": float(rewards.mean()), "advantage_std": float(adv.std()),
                 "within_prompt_score_std": float(grouped.std(dim=1).mean()),
                 "reply_tokens": float(mask.sum(dim=1).mean()), "replies_seen": seen,
                 "rollout_s": rollout_s, "elapsed_s": time.perf_counter() - t0}
        history.append(m_out)
        on_step(m_out)
    return {"algo": "rloo", "steps": len(history), "replies_seen": seen, "first_loss": history[0]["loss"],
            "final_loss": history[-1]["loss"], "first_reward": history[0]["mean_reward"],
            "final_reward": history[-1]["mean_reward"], "final_kl": history[-1]["kl"],
            "train_s": time.perf_counter() - t0, "history": history}
