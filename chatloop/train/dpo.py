"""Direct Preference Optimization on a LoRA adapter.

Owns: the DPO loss family as plain math on log-ratios (sigmoid with label smoothing, IPO) and
the training loop that fits a LoRA adapter to preference pairs.

Invariants:
- The policy starts as a copy of the reference (the adapter active when the snapshot was taken),
  so reference log-probs are the policy's own log-probs before the first update: computed once
  per pair, in eval mode, before training; no second model is held in memory.
- Only LoRA parameters train; log-probs cover reply tokens only, and chosen and rejected share
  one pass over their prompt (see ``common``).
- IPO uses length-averaged log-probs (as in the IPO paper's and TRL's implementations);
  sigmoid DPO uses summed log-probs.
- With at least ``select_min_heldout`` held-out pairs and ``select_best`` the adapter handed back
  is the one with the lowest held-out DPO loss among the starting point and ``evals_per_epoch``
  checkpoints per epoch (``common.HeldOutSelection``); the held-out metrics then describe the set
  it was chosen on.

Thumbs (``thumbs_weight`` > 0): a lone thumb on a reply makes no pair, yet thumbs are about half of
what users give. Each step then also takes ``thumbs_per_step`` of the snapshot's thumbs, in a seeded
cycle through them, and adds ``thumbs_weight`` times their KTO loss with its reference point z
fixed at 0 (TRL's ``apo_zero_unpaired``; Anchored Preference Optimization, D'Oosterlinck et al.
2024): 1 - sigmoid(beta * log pi/ref(y)) for a thumbs-up and sigmoid(beta * log pi/ref(y)) for a
thumbs-down, summed log-probs. Fixing z skips KTO's mismatched pass, so a thumb costs one reply's
forward. Checkpoint selection still reads the held-out pairs only, and
``first_loss``/``final_loss`` are the pairs' own loss.

Balance (``thumbs_balance``): when both kinds exist, every step takes half its thumbs from the ups
and half from the downs (each kind in its own seeded cycle; an odd count alternates the extra one),
so both kinds pull equally at every step, however the votes split (sampling, not KTO's balanced
weights: why, and why the term is opt-in, is in docs/LOG.md, 2026-11-23).

NLL on the chosen replies (``nll_weight`` > 0): RPO (Pang et al. 2024, "Iterative Reasoning
Preference Optimization"; TRL's ``rpo_alpha``) adds the chosen replies' negative log-likelihood,
averaged over their tokens in the step, to keep the policy near text that users preferred while
DPO and the thumbs push log-ratios apart; ``first_loss``/``final_loss`` stay the pairs' own loss.
Opt-in (docs/LOG.md, 2026-11-23).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from chatloop.train.common import (Encoded, HeldOutSelection, TrainConfig, collate_groups, encode_reply, fit,
                                   grouped_reply_logprobs, reference_logprobs)
from chatloop.train.kto import kto_loss


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and the implicit rewards of chosen and rejected replies.

    logits = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r))
    sigmoid: -(1-eps) log sigma(beta*logits) - eps log sigma(-beta*logits)   (cDPO smoothing)
    ipo:     (logits - 1/(2 beta))^2
    """
    logits = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "sigmoid":
        losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                  - F.logsigmoid(-beta * logits) * label_smoothing)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r}; use sigmoid or ipo")
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


@dataclass
class DpoConfig(TrainConfig):
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    thumbs_weight: float = 0.0  # weight of the thumbs' loss (see the module docstring); 0 = pairs only
    thumbs_per_step: int = 2
    thumbs_balance: bool = True  # every step takes as many ups as downs (see the module docstring)
    nll_weight: float = 0.0  # RPO: plus this times the chosen replies' mean per-token NLL (see the module docstring)


@dataclass
class EncodedPair:
    chosen: Encoded
    rejected: Encoded
    ref_chosen: float = 0.0
    ref_rejected: float = 0.0


def encode_pairs(tokenizer, pairs: list[dict], cfg: DpoConfig) -> list[EncodedPair]:
    out = []
    for p in pairs:
        out.append(EncodedPair(
            chosen=encode_reply(tokenizer, p["prompt"], p["chosen"], cfg.max_prompt_tokens, cfg.max_reply_tokens),
            rejected=encode_reply(tokenizer, p["prompt"], p["rejected"], cfg.max_prompt_tokens, cfg.max_reply_tokens),
        ))
    return out


def _pair_logprobs(model, items: list[EncodedPair], pad_id: int, average: bool,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected log-probs for a batch of pairs: one pass over each prompt, both replies
    continuing from its cache."""
    groups = collate_groups([(e.chosen, e.rejected) for e in items], pad_id).to(device)
    lp = grouped_reply_logprobs(model, groups, average=average)
    return lp[: len(items)], lp[len(items):]


def fill_reference(model, pairs: list[EncodedPair], pad_id: int, cfg: DpoConfig, device: torch.device) -> None:
    """Reference log-probs, once per pair, from the model as it is before training."""
    values = reference_logprobs(model, [(e.chosen, e.rejected) for e in pairs], pad_id, cfg.batch_size, device,
                                average=cfg.loss_type == "ipo")
    for e, (chosen, rejected) in zip(pairs, values):
        e.ref_chosen, e.ref_rejected = chosen, rejected


@torch.no_grad()
def evaluate_pairs(model, pairs: list[EncodedPair], pad_id: int, cfg: DpoConfig,
                   device: torch.device) -> dict[str, float]:
    """Implicit-reward accuracy (ties count half) and mean margin on pairs with references."""
    if not pairs:
        return {}
    was_training = model.training
    model.eval()
    average = cfg.loss_type == "ipo"
    correct, margins, losses = 0.0, [], []
    ordered = sorted(pairs, key=lambda e: max(len(e.chosen), len(e.rejected)))  # less padding
    for i in range(0, len(ordered), cfg.batch_size):
        chunk = ordered[i: i + cfg.batch_size]
        c, r = _pair_logprobs(model, chunk, pad_id, average, device)
        rc = torch.tensor([e.ref_chosen for e in chunk], device=c.device)
        rr = torch.tensor([e.ref_rejected for e in chunk], device=c.device)
        loss, cr, rj = dpo_loss(c, r, rc, rr, cfg.beta, cfg.loss_type, cfg.label_smoothing)
        m = (cr - rj)
        correct += float((m > 0).sum() + 0.5 * (m == 0).sum())
        margins += m.tolist()
        losses += loss.tolist()
    model.train(was_training)
    return {"accuracy": correct / len(pairs), "margin": sum(margins) / len(margins),
            "loss": sum(losses) / len(losses), "pairs": len(pairs)}


@dataclass
class EncodedThumb:
    reply: Encoded
    desirable: bool
    ref: float = 0.0


class _SeededCycle:
    """Items in a seeded order, reshuffled on every pass."""

    def __init__(self, items: list, rng: random.Random):
        self.items, self._rng, self._queue = items, rng, []

    def take(self, n: int) -> list:
        out = []
        while len(out) < n:
            if not self._queue:
                self._queue = list(range(len(self.items)))
                self._rng.shuffle(self._queue)
            out.append(self.items[self._queue.pop()])
        return out


class ThumbsTerm:
    """The thumbs' part of a DPO step: ``thumbs_per_step`` thumbs from seeded cycles (one per kind
    when balanced), their reference log-probs computed once before training, and KTO's loss with
    z = 0 at weight 1 for both kinds."""

    def __init__(self, thumbs: list[EncodedThumb], cfg: DpoConfig):
        self.cfg, self._steps = cfg, 0
        rng = random.Random(cfg.seed + 1)
        ups, downs = [t for t in thumbs if t.desirable], [t for t in thumbs if not t.desirable]
        self.counts = (len(ups), len(downs))
        self.stratified = cfg.thumbs_balance and bool(ups) and bool(downs)
        self._cycles = ([_SeededCycle(ups, rng), _SeededCycle(downs, rng)] if self.stratified
                        else [_SeededCycle(thumbs, rng)])
        self.per_step = min(cfg.thumbs_per_step, len(thumbs))

    def _next(self) -> list[EncodedThumb]:
        if not self.stratified:
            return self._cycles[0].take(self.per_step)
        n_up = self.per_step // 2 + (self.per_step % 2 if self._steps % 2 == 0 else 0)
        self._steps += 1
        return self._cycles[0].take(n_up) + self._cycles[1].take(self.per_step - n_up)

    def loss(self, model, pad_id: int, device) -> tuple[torch.Tensor, dict[str, float]]:
        chunk = self._next()
        lp = grouped_reply_logprobs(model, collate_groups([(t.reply,) for t in chunk], pad_id).to(device))
        ref = torch.tensor([t.ref for t in chunk], device=lp.device)
        desirable = torch.tensor([t.desirable for t in chunk], device=lp.device)
        zero = torch.zeros(1, device=lp.device)  # z = 0: no mismatched pass
        losses, rewards, _ = kto_loss(lp, ref, desirable, zero, zero, self.cfg.beta)
        return losses.mean(), {"thumbs_loss": float(losses.detach().mean()),
                               "thumbs_up_reward": float(rewards[desirable].mean()) if desirable.any() else None,
                               "thumbs_down_reward": float(rewards[~desirable].mean()) if (~desirable).any() else None}


def encode_thumbs(tokenizer, rows: list[dict], cfg: DpoConfig) -> list[EncodedThumb]:
    """rows: {"prompt": [...messages], "completion": str, "label": bool} (the snapshot's thumbs)."""
    return [EncodedThumb(encode_reply(tokenizer, r["prompt"], r["completion"], cfg.max_prompt_tokens,
                                      cfg.max_reply_tokens), bool(r["label"])) for r in rows]


def fill_thumb_reference(model, thumbs: list[EncodedThumb], pad_id: int, batch_size: int, device) -> None:
    for t, (ref,) in zip(thumbs, reference_logprobs(model, [(t.reply,) for t in thumbs], pad_id, batch_size, device)):
        t.ref = ref


def train_dpo(
    model,
    tokenizer,
    train_pairs: list[dict],
    eval_pairs: list[dict],
    cfg: DpoConfig,
    on_step: Callable[[dict], None] = lambda m: None,
    should_stop: Callable[[], bool] = lambda: False,
    thumbs: list[dict] = (),
) -> dict:
    """Fit the trainable (LoRA) parameters of ``model`` with DPO (plus, with ``cfg.thumbs_weight``,
    the unpaired ``thumbs``); returns summary metrics."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    train = encode_pairs(tokenizer, train_pairs, cfg)
    held = encode_pairs(tokenizer, eval_pairs, cfg)
    lone = encode_thumbs(tokenizer, list(thumbs), cfg) if cfg.thumbs_weight > 0 else []
    t_train = time.perf_counter()
    fill_reference(model, train + held, pad_id, cfg, device)
    fill_thumb_reference(model, lone, pad_id, cfg.batch_size, device)
    term = ThumbsTerm(lone, cfg) if lone else None
    average = cfg.loss_type == "ipo"

    def step(idx: list[int]):
        chunk = [train[j] for j in idx]
        c, r = _pair_logprobs(model, chunk, pad_id, average, device)
        rc = torch.tensor([e.ref_chosen for e in chunk], device=c.device)
        rr = torch.tensor([e.ref_rejected for e in chunk], device=c.device)
        losses, cr, rj = dpo_loss(c, r, rc, rr, cfg.beta, cfg.loss_type, cfg.label_smoothing)
        loss = losses.mean()
        metrics = {
            "reward_accuracy": float((cr > rj).float().mean()),
            "reward_margin": float((cr - rj).mean()),
            "chosen_reward": float(cr.mean()), "rejected_reward": float(rj.mean()),
            "logp_chosen": float(c.detach().mean()), "logp_rejected": float(r.detach().mean()),
        }
        if term is not None or cfg.nll_weight:
            metrics["pairs_loss"] = float(loss.detach())
        if cfg.nll_weight:
            lengths = torch.tensor([len(e.chosen.reply_ids) for e in chunk], device=c.device, dtype=c.dtype)
            summed = c * lengths if average else c  # IPO's log-probs are per-token averages
            nll = -summed.sum() / lengths.sum()
            loss = loss + cfg.nll_weight * nll
            metrics["nll"] = float(nll.detach())
        if term is not None:
            extra, thumb_metrics = term.loss(model, pad_id, device)
            loss = loss + cfg.thumbs_weight * extra
            metrics.update(thumb_metrics)
        return loss, metrics

    selection = None
    if held and cfg.select_best and len(held) >= cfg.select_min_heldout:
        zero = torch.zeros(1)  # the policy is its reference at the start: every log-ratio is 0
        start = float(dpo_loss(zero, zero, zero, zero, cfg.beta, cfg.loss_type, cfg.label_smoothing)[0][0])
        selection = HeldOutSelection.per_epoch(
            lambda: evaluate_pairs(model, held, pad_id, cfg, device), len(train), cfg.batch_size,
            cfg.evals_per_epoch, cfg.patience,
            initial={"accuracy": 0.5, "margin": 0.0, "loss": start, "pairs": len(held)})
    history = fit(model, len(train), cfg.batch_size, cfg.epochs, cfg.learning_rate, cfg.seed, step,
                  on_step, should_stop, lengths=[max(len(e.chosen), len(e.rejected)) for e in train],
                  selection=selection)
    train_s = time.perf_counter() - t_train  # the reference pass and the optimisation steps
    metrics = {
        "algo": "dpo", "steps": len(history), "train_pairs": len(train), "eval_pairs": len(held),
        "train_thumbs": len(lone), "thumbs_up_down": list(term.counts) if term else None,
        "thumbs_stratified": term.stratified if term else None,
        "selection": selection.summary() if selection else None,
        # the pairs' DPO loss (without the thumbs' or NLL terms), which train_eval and held_out also measure
        "first_loss": history[0].get("pairs_loss", history[0]["loss"]) if history else None,
        "final_loss": history[-1].get("pairs_loss", history[-1]["loss"]) if history else None,
        # the gate reads training-set metrics only when nothing is held out: score them only then
        "train_eval": {} if held else evaluate_pairs(model, train, pad_id, cfg, device),
        "held_out": selection.best_metrics if selection else evaluate_pairs(model, held, pad_id, cfg, device),
        "train_s": train_s,
        "pairs_per_s": len(train) * cfg.epochs / max(train_s, 1e-9),
        "total_s": time.perf_counter() - t0,
        "history": history,
    }
    return metrics
