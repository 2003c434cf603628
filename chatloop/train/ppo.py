"""PPO with a reward model, on a LoRA adapter (the standard RLHF recipe of Ziegler et al. 2019 /
Stiennon et al. 2020 / Ouyang et al. 2022, as TRL's PPOTrainer implements it).

Owns: the PPO math (per-token KL-penalised rewards, GAE, whitening, clipped policy and value
losses, the adaptive KL controller) and the rollout/optimisation loop.

Per rollout batch:
1. sample replies to logged prompts from the policy;
2. score each (prompt, reply) with the reward model, once, at the end of the reply;
3. per-token reward r_t = -kl_coef * (log pi(y_t) - log ref(y_t)), plus the score on the last token;
4. values from a scalar head on the policy's hidden states; GAE(gamma, lambda) advantages,
   whitened over the batch's reply tokens; returns = advantages + values;
5. ``ppo_epochs`` passes of minibatches with the clipped policy loss and the clipped value loss;
6. the KL coefficient adapts towards ``target_kl`` (proportional controller, clipped to +-20%).

With ``relevance_coef``, step 2's score also loses that much times how far the reply's task
relevance (the gate's PMI, ``relevance.py``) falls below the first rollout's mean, with
``register_coef`` that much times how far its register gap (``register.py``) rises above the first
rollout's mean, with ``document_coef`` that much times how far its document likelihood falls below
the first rollout's mean, and with ``degenerate_penalty`` that much for a degenerate reply
(``degenerate.py``), as RLOO's does.

Invariants: the reference is frozen (the active adapter; None: the base model, the policy under
``disable_adapter``);
log-probs, values and entropies cover reply tokens only; padding never counts.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from chatloop.train.common import Batch, Encoded, collate, sample_replies, split_lm
from chatloop.train.degenerate import degenerate_penalty
from chatloop.train.register import FramingTerm, plain_prompt_ids
from chatloop.train.relevance import relevance_penalty


# ---- the math ------------------------------------------------------------------------------------
def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries (unbiased variance, as TRL)."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = ((x - mean) ** 2 * mask).sum() / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_penalized_rewards(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                         scores: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards -kl_coef*(logp - ref_logp), plus each row's score on its last reply token.

    Returns (rewards, per-token KL estimate); both zero on padding.
    """
    kl = (logp - ref_logp) * mask
    rewards = -kl_coef * kl
    last = mask.sum(dim=1).long() - 1
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last] += scores
    return rewards * mask, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded rows; returns (advantages, returns).

    delta_t = r_t + gamma * V_{t+1} - V_t (V after the last token is 0),
    A_t = delta_t + gamma * lam * A_{t+1}.
    """
    rewards, values = rewards * mask, values * mask
    T = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        next_v = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = delta + gamma * lam * last
        adv[:, t] = last
    adv = adv * mask
    return adv, (adv + values) * mask


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor,
                        mask: torch.Tensor, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """max(-A * ratio, -A * clip(ratio, 1-eps, 1+eps)), averaged over reply tokens; and clip fraction."""
    ratio = torch.exp(logp - old_logp)
    loss1 = -adv * ratio
    loss2 = -adv * torch.clamp(ratio, 1 - clip, 1 + clip)
    loss = masked_mean(torch.max(loss1, loss2), mask)
    clipfrac = masked_mean((loss2 > loss1).float(), mask)
    return loss, clipfrac


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor, clip: float) -> torch.Tensor:
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


class AdaptiveKLController:
    """Ziegler et al. 2019: beta <- beta * (1 + clip(KL/target - 1, -0.2, 0.2) * n_steps / horizon)."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        error = max(-0.2, min(0.2, current_kl / self.target - 1))
        self.value *= 1 + error * n_steps / self.horizon
        return self.value


# ---- the loop ------------------------------------------------------------------------------------
@dataclass
class PpoConfig:
    learning_rate: float = 1e-5
    rollout_batch_size: int = 8
    minibatch_size: int = 4
    ppo_epochs: int = 4
    rollouts: int = 4  # rollout batches per cycle
    max_new_tokens: int = 48
    max_prompt_tokens: int = 384
    temperature: float = 1.0
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    init_kl_coef: float = 0.05
    target_kl: float = 6.0
    kl_horizon: int = 10000
    whiten_rewards: bool = False
    relevance_coef: float = 0.0  # as RlooConfig's: the hinge on the reply's relevance (0 = off)
    degenerate_penalty: float = 0.0  # as RlooConfig's: minus this for a degenerate reply (0 = off)
    register_coef: float = 0.0  # as RlooConfig's: the hinge on the reply's register gap (0 = off)
    document_coef: float = 0.0  # as RlooConfig's: the hinge on the reply's document likelihood (0 = off)
    seed: int = 0


@dataclass
class Rollout:
    batch: Batch
    mask: torch.Tensor  # (B, R) reply tokens
    logp: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


def token_forward(model: torch.nn.Module, value_head: torch.nn.Module | None, batch: Batch,
                  temperature: float = 1.0):
    """Per reply token: log-prob, entropy and value, as right-padded (B, R) tensors, plus the mask.

    Position t predicts token t+1; the LM head and value head run only on those positions.
    Log-probs are of the sampling distribution (logits / temperature), as the rollouts used.
    """
    decoder, head = split_lm(model)
    hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    predict = batch.reply_mask[:, 1:]
    rows, cols = predict.nonzero(as_tuple=True)
    logits = head(hidden[rows, cols]).float() / temperature
    logprobs = F.log_softmax(logits, dim=-1)
    targets = batch.input_ids[rows, cols + 1]
    token_lp = logprobs.gather(1, targets[:, None]).squeeze(1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    lengths = predict.sum(dim=1)
    R = int(lengths.max())
    first = torch.argmax(predict.int(), dim=1)  # first predicting position of each row
    slot = cols - first[rows]
    shape = (batch.input_ids.shape[0], R)
    lp = torch.zeros(shape, device=token_lp.device).index_put((rows, slot), token_lp)
    ent = torch.zeros(shape, device=token_lp.device).index_put((rows, slot), entropy)
    mask = torch.zeros(shape, device=token_lp.device).index_put((rows, slot), torch.ones_like(token_lp))
    val = None
    if value_head is not None:
        v = value_head(hidden[rows, cols].to(value_head.weight.dtype)).squeeze(-1).float()
        val = torch.zeros(shape, device=token_lp.device).index_put((rows, slot), v)
    return lp, ent, val, mask


def _relevance(policy, base_lp: torch.Tensor | None, prompt_ids: list[list[int]], replies: list[list[int]],
               mask: torch.Tensor, tokenizer, device) -> torch.Tensor:
    """Each reply's task relevance (``relevance.py``: the base model's PMI of reply and prompt per
    token against another prompt of the batch; the base is the policy under ``disable_adapter``),
    given the base's log-probs after the replies' own prompts at T = 1 when already computed."""
    from chatloop.train.relevance import empty_prompt_ids, mismatched, per_token_pmi

    def base(prompts: list[list[int]]) -> torch.Tensor:
        batch = collate([Encoded(p, y) for p, y in zip(prompts, replies)], tokenizer.pad_token_id).to(device)
        with policy.disable_adapter():
            return token_forward(policy, None, batch)[0]

    own = base(prompt_ids) if base_lp is None else base_lp
    other_lp = base(mismatched(prompt_ids, empty_prompt_ids(tokenizer)))
    empty = torch.tensor([all(t == tokenizer.eos_token_id for t in r) for r in replies], device=device)
    return per_token_pmi(own, other_lp, mask, empty)


def ppo_update(policy, value_head, opt, params, ro: Rollout, cfg: PpoConfig, gen: torch.Generator,
               should_stop: Callable[[], bool] = lambda: False) -> list[dict]:
    """``ppo_epochs`` passes of minibatch updates on one rollout batch; per-minibatch stats."""
    device = ro.batch.input_ids.device
    n = ro.batch.input_ids.shape[0]
    policy.train()
    stats = []
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(n, generator=gen).tolist()
        for s in range(0, n, cfg.minibatch_size):
            if should_stop():
                raise InterruptedError("training cancelled")
            idx = torch.tensor(order[s: s + cfg.minibatch_size], device=device)
            mb = Batch(ro.batch.input_ids[idx], ro.batch.attention_mask[idx], ro.batch.reply_mask[idx])
            logp, ent, values, m = token_forward(policy, value_head, mb, cfg.temperature)
            R = m.shape[1]
            old_logp = ro.logp[idx, :R]
            pg_loss, clipfrac = clipped_policy_loss(logp, old_logp, ro.advantages[idx, :R], m, cfg.clip_range)
            vf_loss = clipped_value_loss(values, ro.values[idx, :R], ro.returns[idx, :R], m, cfg.clip_range_value)
            loss = pg_loss + cfg.vf_coef * vf_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            stats.append({"policy_loss": float(pg_loss.detach()), "value_loss": float(vf_loss.detach()),
                          "clip_fraction": float(clipfrac), "entropy": float(masked_mean(ent.detach(), m)),
                          "approx_kl": float(0.5 * masked_mean((logp.detach() - old_logp) ** 2, m)),
                          "loss": float(loss.detach())})
    policy.eval()
    return stats


def train_ppo(
    policy: torch.nn.Module,
    reference: torch.nn.Module | None,
    tokenizer,
    prompts: Sequence[list[dict]],
    reward_fn: Callable[[list[tuple[list[dict], str]]], list[float]],
    cfg: PpoConfig,
    on_step: Callable[[dict], None] = lambda m: None,
    should_stop: Callable[[], bool] = lambda: False,
) -> dict:
    """Optimise the policy's trainable (LoRA) parameters and a value head with PPO.
    ``reference`` None means the base model under the policy's adapter (``disable_adapter``)."""
    if not prompts:
        raise ValueError("PPO needs logged prompts to roll out on")
    device = next(policy.parameters()).device
    hidden = policy.get_base_model().config.hidden_size if hasattr(policy, "get_base_model") else policy.config.hidden_size
    torch.manual_seed(cfg.seed)
    value_head = torch.nn.Linear(hidden, 1).to(device)
    torch.nn.init.zeros_(value_head.weight)
    torch.nn.init.zeros_(value_head.bias)
    params = [p for p in policy.parameters() if p.requires_grad] + list(value_head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    kl_ctl = AdaptiveKLController(cfg.init_kl_coef, cfg.target_kl, cfg.kl_horizon)
    encoded = [list(tokenizer.apply_chat_template(list(p), add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"])[-cfg.max_prompt_tokens:]
               for p in prompts]
    framing = FramingTerm(cfg.register_coef, cfg.document_coef)  # the register and document hinges
    plain = [plain_prompt_ids(tokenizer, p, cfg.max_prompt_tokens) for p in prompts] if framing.on else []
    minibatches_per_rollout = math.ceil(cfg.rollout_batch_size / cfg.minibatch_size) * cfg.ppo_epochs
    total = cfg.rollouts * minibatches_per_rollout
    history: list[dict] = []
    t0 = time.perf_counter()
    step = 0
    floor: float | None = None  # the relevance the policy started at (first rollout's mean)
    gen = torch.Generator().manual_seed(cfg.seed)
    for r in range(cfg.rollouts):
        if should_stop():
            raise InterruptedError("training cancelled")
        pick = torch.randint(len(prompts), (cfg.rollout_batch_size,), generator=gen).tolist()
        policy.eval()
        replies = sample_replies(policy, tokenizer, [encoded[i] for i in pick], cfg.max_new_tokens,
                                 cfg.seed * 1000 + r, temperature=cfg.temperature)
        batch = collate([Encoded(encoded[i], y) for i, y in zip(pick, replies)], tokenizer.pad_token_id).to(device)
        texts = [tokenizer.decode(y, skip_special_tokens=True) for y in replies]
        scores = torch.tensor(reward_fn([(list(prompts[i]), t) for i, t in zip(pick, texts)]),
                              dtype=torch.float, device=device)
        with torch.no_grad():
            old_logp, _, old_values, mask = token_forward(policy, value_head, batch, cfg.temperature)
            if reference is None:
                with policy.disable_adapter():
                    ref_logp, _, _, _ = token_forward(policy, None, batch, cfg.temperature)
            else:
                ref_logp, _, _, _ = token_forward(reference, None, batch, cfg.temperature)
            reward_scores, relevance, degenerate, register, document = scores, None, None, None, None  # unshaped
            if cfg.degenerate_penalty:
                penalty, degenerate = degenerate_penalty([encoded[i] for i in pick], replies, tokenizer.eos_token_id,
                                                         cfg.degenerate_penalty, device)
                scores = scores + penalty
            if framing.on:
                penalty, register, document = framing(
                    policy, tokenizer, [encoded[i] for i in pick], [plain[i] for i in pick], replies, device)
                scores = scores + penalty
            if cfg.relevance_coef:
                reusable = reference is None and cfg.temperature == 1.0  # the reference pass was the base's at T = 1
                relevance = _relevance(policy, ref_logp if reusable else None, [encoded[i] for i in pick], replies,
                                       mask, tokenizer, device)
                if floor is None:
                    floor = float(relevance.mean())
                scores = scores + relevance_penalty(relevance, floor, cfg.relevance_coef)
            rewards, kl = kl_penalized_rewards(old_logp, ref_logp, mask, scores, kl_ctl.value)
            if cfg.whiten_rewards:
                rewards = whiten(rewards, mask, shift_mean=False)
            adv, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
            adv = whiten(adv, mask)
        rollout_kl = float(kl.sum(dim=1).mean())
        stats = ppo_update(policy, value_head, opt, params,
                           Rollout(batch, mask, old_logp, old_values, adv, returns), cfg, gen, should_stop)
        step += len(stats)
        kl_ctl.update(rollout_kl, cfg.rollout_batch_size)
        mean = {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}
        shaping = ({"mean_relevance": float(relevance.mean()), "relevance_floor": floor} if relevance is not None else {})
        if register is not None:
            shaping.update(framing.logged(register, document))
        if relevance is not None or degenerate is not None or register is not None:
            shaping["mean_shaped_reward"] = float(scores.mean())
        if degenerate is not None:
            shaping["degenerate_share"] = degenerate
        m_out = {"step": step, "total": total, "rollout": r, **mean, "mean_reward": float(reward_scores.mean()), **shaping,
                 "kl": rollout_kl, "kl_coef": kl_ctl.value,
                 "reply_tokens": float(mask.sum(dim=1).mean()), "elapsed_s": time.perf_counter() - t0}
        history.append(m_out)
        on_step(m_out)
    policy.eval()
    return {"algo": "ppo", "steps": step, "rollouts": cfg.rollouts, "first_loss": history[0]["loss"],
            "final_loss": history[-1]["loss"], "first_reward": history[0]["mean_reward"],
            "final_reward": history[-1]["mean_reward"], "final_kl": history[-1]["kl"],
            "train_s": time.perf_counter() - t0, "history": history}
