"""Kahneman-Tversky Optimization (KTO) from unpaired thumbs, on a LoRA adapter.

Owns: the KTO loss (Ethayarajh et al. 2024, eq. 7, as TRL implements it) and its training loop.

loss(desirable y)   = w_d * (1 - sigmoid(beta * (log pi/ref (y|x) - z)))
loss(undesirable y) = w_u * (1 - sigmoid(beta * (z - log pi/ref (y|x))))
z = max(0, mean over the batch of log pi/ref (y'|x)), a detached KL estimate from mismatched
(prompt, reply) pairs: each example's prompt with the reply of its neighbour in the batch.
With ``balance`` (the default) the rarer kind of thumb is up-weighted so that w_d * n_d = w_u * n_u
whenever the paper's range [1, 4/3] for that ratio is left.

Invariants: as in DPO, the reference is the policy before the first update, so reference
log-probs (matched and mismatched) are computed once per example before training. The
mismatched reply of each example is fixed at preparation (rotation by one inside consecutive
chunks of ``batch_size``, as TRL does), so its reference log-prob stays valid across epochs.
With at least ``select_min_heldout`` held-out thumbs and ``select_best`` the adapter handed back is
the checkpoint with the lowest held-out KTO loss (``common.HeldOutSelection``), as in DPO.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable

import torch

from chatloop.train.common import (Encoded, HeldOutSelection, TrainConfig, collate_groups, encode_reply, fit,
                                   grouped_reply_logprobs, reference_logprobs)


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    policy_kl_logps: torch.Tensor,
    ref_kl_logps: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example KTO losses, implicit rewards beta*log(pi/ref), and the KL estimate z."""
    kl = (policy_kl_logps - ref_kl_logps).mean().detach().clamp(min=0)
    logratio = policy_logps - ref_logps
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (logratio - kl))),
        undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratio))),
    )
    return losses, beta * logratio.detach(), kl


def balanced_weights(n_desirable: int, n_undesirable: int, desirable_weight: float = 1.0,
                     undesirable_weight: float = 1.0) -> tuple[float, float]:
    """The KTO paper's advice: keep w_d * n_d / (w_u * n_u) in [1, 4/3]. The rarer kind's
    weight is raised until the ratio is 1 (when it is already in range nothing changes), so both
    kinds of thumb pull equally however the votes happen to split."""
    if n_desirable <= 0 or n_undesirable <= 0:
        return desirable_weight, undesirable_weight
    ratio = desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
    if ratio > 4 / 3:
        return desirable_weight, undesirable_weight * ratio
    if ratio < 1:
        return desirable_weight / ratio, undesirable_weight
    return desirable_weight, undesirable_weight


@dataclass
class KtoConfig(TrainConfig):
    batch_size: int = 8
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    balance: bool = True  # apply ``balanced_weights`` to the training set's counts


@dataclass
class KtoExample:
    matched: Encoded
    mismatched: Encoded  # this prompt with another example's reply (the KL estimate)
    desirable: bool
    ref: float = 0.0
    ref_kl: float = 0.0


def encode_examples(tokenizer, rows: list[dict], cfg: KtoConfig) -> list[KtoExample]:
    """rows: {"prompt": [...messages], "completion": str, "label": bool}."""
    out = []
    for start in range(0, len(rows), cfg.batch_size):
        chunk = rows[start: start + cfg.batch_size]
        rotated = [chunk[-1]] + chunk[:-1]  # (x_1, y_n), (x_2, y_1), ...
        for row, other in zip(chunk, rotated):
            out.append(KtoExample(
                matched=encode_reply(tokenizer, row["prompt"], row["completion"], cfg.max_prompt_tokens, cfg.max_reply_tokens),
                mismatched=encode_reply(tokenizer, row["prompt"], other["completion"], cfg.max_prompt_tokens, cfg.max_reply_tokens),
                desirable=bool(row["label"]),
            ))
    return out


def _logps(model, items: list[KtoExample], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Matched and mismatched log-probs: one pass over each prompt, both replies on its cache."""
    groups = collate_groups([(e.matched, e.mismatched) for e in items], pad_id).to(device)
    lp = grouped_reply_logprobs(model, groups)
    return lp[: len(items)], lp[len(items):]


def fill_reference(model, examples: list[KtoExample], pad_id: int, batch_size: int, device) -> None:
    values = reference_logprobs(model, [(e.matched, e.mismatched) for e in examples], pad_id, batch_size, device)
    for e, (matched, mismatched) in zip(examples, values):
        e.ref, e.ref_kl = matched, mismatched


def train_kto(
    model,
    tokenizer,
    rows: list[dict],
    eval_rows: list[dict],
    cfg: KtoConfig,
    on_step: Callable[[dict], None] = lambda m: None,
    should_stop: Callable[[], bool] = lambda: False,
) -> dict:
    if not any(r["label"] for r in rows) or all(r["label"] for r in rows):
        raise ValueError("KTO needs both thumbs-up and thumbs-down replies to train on")
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    train = encode_examples(tokenizer, rows, cfg)
    held = encode_examples(tokenizer, eval_rows, cfg)
    fill_reference(model, train + held, pad_id, cfg.batch_size, device)
    n_good = sum(e.desirable for e in train)
    if cfg.balance:  # the weights training uses; the losses evaluated below use the same ones
        w_good, w_bad = balanced_weights(n_good, len(train) - n_good, cfg.desirable_weight, cfg.undesirable_weight)
        cfg = replace(cfg, desirable_weight=w_good, undesirable_weight=w_bad, balance=False)

    def step(idx: list[int]):
        chunk = [train[j] for j in idx]
        policy, policy_kl = _logps(model, chunk, pad_id, device)
        ref = torch.tensor([e.ref for e in chunk], device=policy.device)
        ref_kl = torch.tensor([e.ref_kl for e in chunk], device=policy.device)
        desirable = torch.tensor([e.desirable for e in chunk], device=policy.device)
        losses, rewards, kl = kto_loss(policy, ref, desirable, policy_kl.detach(), ref_kl, cfg.beta,
                                       cfg.desirable_weight, cfg.undesirable_weight)
        good, bad = rewards[desirable], rewards[~desirable]
        return losses.mean(), {
            "kl": float(kl),
            "desirable_reward": float(good.mean()) if len(good) else None,
            "undesirable_reward": float(bad.mean()) if len(bad) else None,
        }

    selection = None
    if held and cfg.select_best and len(held) >= cfg.select_min_heldout:
        # at the start every log-ratio and z are 0: each example's loss is half its weight, every
        # reward ties (accuracies 0.5)
        start = sum(cfg.desirable_weight if e.desirable else cfg.undesirable_weight for e in held) / 2 / len(held)
        selection = HeldOutSelection.per_epoch(
            lambda: evaluate(model, held, pad_id, cfg, device), len(train), cfg.batch_size,
            cfg.evals_per_epoch, cfg.patience,
            initial={"accuracy": 0.5, "sign_accuracy": 0.5, "loss": start, "examples": len(held)})
    history = fit(model, len(train), cfg.batch_size, cfg.epochs, cfg.learning_rate, cfg.seed, step,
                  on_step, should_stop, lengths=[max(len(e.matched), len(e.mismatched)) for e in train],
                  selection=selection)
    return {
        "algo": "kto", "steps": len(history), "train_examples": len(train), "eval_examples": len(held),
        "selection": selection.summary() if selection else None,
        "desirable": n_good, "undesirable": len(train) - n_good,
        "desirable_weight": cfg.desirable_weight, "undesirable_weight": cfg.undesirable_weight,
        "first_loss": history[0]["loss"], "final_loss": history[-1]["loss"],
        # the gate reads training-set metrics only when nothing is held out: score them only then
        "train_eval": {} if held else evaluate(model, train, pad_id, cfg, device),
        "held_out": selection.best_metrics if selection else evaluate(model, held, pad_id, cfg, device),
        "train_s": time.perf_counter() - t0, "history": history,
    }


@torch.no_grad()
def evaluate(model, examples: list[KtoExample], pad_id: int, cfg: KtoConfig, device) -> dict:
    """How well the implicit reward beta*log(pi/ref) orders the thumbs, and the loss.

    ``accuracy`` is the ranking accuracy: the share of (thumbs-up, thumbs-down) pairs of examples
    whose rewards are in the thumbs' order, ties counting half (the reference scores every reply 0,
    so 0.5). It does not move when every reward shifts alike, which KTO's reference point z allows.
    With only one kind of thumb it falls back to ``sign_accuracy``, the share of rewards with the
    thumb's sign.
    """
    if not examples:
        return {}
    model.eval()
    rewards_all, desirable_all, losses = [], [], []
    for i in range(0, len(examples), cfg.batch_size):
        chunk = examples[i: i + cfg.batch_size]
        policy, policy_kl = _logps(model, chunk, pad_id, device)
        ref = torch.tensor([e.ref for e in chunk], device=policy.device)
        ref_kl = torch.tensor([e.ref_kl for e in chunk], device=policy.device)
        desirable = torch.tensor([e.desirable for e in chunk], device=policy.device)
        loss, rewards, _ = kto_loss(policy, ref, desirable, policy_kl, ref_kl, cfg.beta,
                                    cfg.desirable_weight, cfg.undesirable_weight)
        rewards_all.append(rewards.float().cpu())
        desirable_all.append(desirable.cpu())
        losses += loss.tolist()
    ranking, sign = thumb_accuracies(torch.cat(rewards_all), torch.cat(desirable_all))
    return {"accuracy": ranking, "sign_accuracy": sign, "loss": sum(losses) / len(losses), "examples": len(examples)}


def thumb_accuracies(rewards: torch.Tensor, desirable: torch.Tensor) -> tuple[float, float]:
    """(ranking accuracy, sign accuracy) of implicit rewards against thumbs, ties counting half;
    the ranking accuracy is the sign accuracy when only one kind of thumb is there."""
    signed = torch.where(desirable, rewards, -rewards)
    sign = float((signed > 0).sum() + 0.5 * (signed == 0).sum()) / len(rewards)
    good, bad = rewards[desirable], rewards[~desirable]
    if not len(good) or not len(bad):
        return sign, sign
    diff = good[:, None] - bad[None, :]
    return float((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.numel(), sign
