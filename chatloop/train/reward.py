"""The reward model: base model + LoRA + a scalar head, trained with a Bradley-Terry loss.

Owns: the reward model's forward (the score of a (context, reply) is the head applied to the
reply's states: its last token's, and by default their mean over the reply too), its losses,
training, and its on-disk artifact (which records the pooling).

loss_pairs  = -log sigmoid(r(chosen) - r(rejected) - margin)            (Bradley-Terry, as TRL)
            + center * mean((r(chosen) + r(rejected))^2)                (optional centring)
loss_thumbs = pointwise_weight * BCE(sigmoid(r(reply)), thumb is up)    (optional, from thumbs)

The head starts at zero, is first fitted alone on the frozen model's states (linear probing, its
l2 chosen by cross-validation over the training pairs' prompts), and then trains with the LoRA at
its own, higher learning rate. With held-out pairs the model handed back is the checkpoint (LoRA
and head) with the lowest held-out pair loss, the probed head before any fine-tuning included,
and training stops early as DPO's does (``common.HeldOutSelection``); the held-out metrics then
describe the set it was chosen on. With ``epochs = 0`` the probed head is the reward model (linear
probing only: one forward pass over the pairs, no LoRA steps; on HH-RLHF fine-tuning added nothing
measurable over the probe, docs/LOG.md), so the same minutes cover several times the pairs.

Artifact (a directory): ``adapter/`` (PEFT LoRA), ``head.safetensors``, ``reward.json`` (base
model path, metrics). ``RewardModel.load`` rebuilds it on any copy of the base model.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from chatloop.config import REWARD_POOLINGS as POOLINGS
from chatloop.train.common import (Encoded, HeldOutSelection, PromptGroups, TrainConfig, collate_groups,
                                   encode_reply, fit, grouped_hidden)


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       center_coefficient: float = 0.0) -> torch.Tensor:
    diff = r_chosen - r_rejected - (margin if margin is not None else 0.0)
    loss = -F.logsigmoid(diff).mean()
    if center_coefficient:
        loss = loss + center_coefficient * torch.mean((r_chosen + r_rejected) ** 2)
    return loss


class RewardModel(torch.nn.Module):
    """A causal LM with LoRA (trainable) whose reply states feed a scalar head: the last reply
    token's state (``last``, as TRL's reward models), or that and the mean of the reply's states
    side by side (``last_mean``, the default: a linear probe of it on the frozen model ranked
    held-out pairs better on two data sets, docs/LOG.md 2026-12-04): the last token of a reply
    cut at a length limit is any word, the mean sees all of it."""

    def __init__(self, lm: torch.nn.Module, hidden_size: int, pooling: str = "last_mean"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"reward pooling {pooling!r}: use one of {', '.join(POOLINGS)}")
        self.lm = lm
        self.pooling = pooling
        self.head = torch.nn.Linear(hidden_size * (2 if pooling == "last_mean" else 1), 1)
        # zero: an untrained reward model is indifferent (every score 0, the first loss log 2),
        # instead of ranking pairs by a random direction of the hidden states
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def features(self, groups: PromptGroups) -> torch.Tensor:
        """The head's inputs, (K*B, H or 2H): the last layer's state at each reply row's last
        token, and with ``last_mean`` the mean of its states over the reply's tokens."""
        _, hidden = grouped_hidden(self.lm, groups)
        mask = groups.reply_mask
        last = mask.sum(dim=1) - 1  # right-padded replies: the last real token
        at_last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        if self.pooling == "last":
            return at_last
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        mean = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
        return torch.cat([at_last, mean], dim=-1)

    def forward(self, groups: PromptGroups) -> torch.Tensor:
        """One score per reply row of ``groups`` (each prompt is run once for all its replies)."""
        return self.head(self.features(groups).to(self.head.weight.dtype)).squeeze(-1)

    # ---- artifact ----------------------------------------------------------------------------
    def save(self, path: Path, meta: dict) -> None:
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        self.lm.save_pretrained(path / "adapter")
        save_file({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()},
                  str(path / "head.safetensors"))
        (path / "reward.json").write_text(json.dumps({"pooling": self.pooling, **meta}, indent=2, default=str))

    @classmethod
    def load(cls, path: Path, base_model: torch.nn.Module) -> "RewardModel":
        from peft import PeftModel
        from safetensors.torch import load_file

        lm = PeftModel.from_pretrained(base_model, path / "adapter")
        # artifacts from before the pooling choice scored the last token only
        pooling = json.loads((path / "reward.json").read_text()).get("pooling", "last")
        rm = cls(lm, base_model.config.hidden_size, pooling)
        rm.head.load_state_dict(load_file(str(path / "head.safetensors")))
        device = next(base_model.parameters()).device
        rm.head.to(device)
        rm.eval()
        return rm


@dataclass
class RewardConfig(TrainConfig):
    """``select_best``: with held-out pairs, the checkpoint (the probed head before any
    fine-tuning included) with the lowest held-out Bradley-Terry loss. ``pooling``: what the
    head reads (``RewardModel``), used where a reward model is built from this config."""
    # The head starts from zero and must move far in a few dozen steps, which it cannot at the
    # LoRA's rate (Adam moves each weight by about the learning rate per step).
    head_learning_rate: float = 1e-3
    # Fit the head alone on the frozen model's states before fine-tuning (see warm_start_head).
    head_warm_start: bool = True
    head_warm_start_l2: float = 0.1
    # the probe's l2 chosen among these by cross-validation on the training pairs (folds by prompt,
    # lowest held-out fold loss); head_warm_start_l2 where the pairs are too few to fold
    head_warm_start_l2_grid: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0, 3.0)
    head_warm_start_folds: int = 5
    epochs: int = 2
    batch_size: int = 8
    center_coefficient: float = 0.0
    pointwise_weight: float = 0.0  # weight of the thumbs term; 0 = pairs only
    pooling: str = "last_mean"


@torch.no_grad()
def _score_groups(rm: RewardModel, groups: list[tuple[Encoded, ...]], pad_id: int, batch_size: int) -> list[list[float]]:
    """Scores of every reply of every group (replies of one group share a prompt pass)."""
    rm.eval()
    device = rm.head.weight.device
    order = sorted(range(len(groups)), key=lambda i: max(len(e) for e in groups[i]))  # less padding
    out: list[list[float]] = [[] for _ in groups]
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        flat = rm(collate_groups([groups[i] for i in idx], pad_id).to(device)).float().tolist()
        for j, i in enumerate(idx):  # row k * B + j is reply k of group j
            out[i] = flat[j::len(idx)]
    return out


def score(rm: RewardModel, tokenizer, items: Sequence[tuple[list[dict], str]], cfg: RewardConfig,
          batch_size: int = 8) -> list[float]:
    """Scores of (context, reply) pairs."""
    enc = [(encode_reply(tokenizer, c, r, cfg.max_prompt_tokens, cfg.max_reply_tokens),) for c, r in items]
    return [v[0] for v in _score_groups(rm, enc, tokenizer.pad_token_id, batch_size)]


def encode_pairs(tokenizer, pairs: list[dict], cfg: RewardConfig) -> list[tuple[Encoded, Encoded]]:
    """(chosen, rejected) encodings of {prompt, chosen, rejected} pairs."""
    return [(encode_reply(tokenizer, p["prompt"], p["chosen"], cfg.max_prompt_tokens, cfg.max_reply_tokens),
             encode_reply(tokenizer, p["prompt"], p["rejected"], cfg.max_prompt_tokens, cfg.max_reply_tokens))
            for p in pairs]


def evaluate_pairs(rm: RewardModel, tokenizer, pairs: list[dict], cfg: RewardConfig,
                   batch_size: int = 8) -> dict:
    """Pair accuracy (ties count half), mean margin r(chosen) - r(rejected) and the mean
    Bradley-Terry loss -log sigmoid(margin)."""
    return _evaluate_encoded(rm, encode_pairs(tokenizer, pairs, cfg), tokenizer.pad_token_id, batch_size)


def _evaluate_encoded(rm: RewardModel, enc: list[tuple[Encoded, Encoded]], pad_id: int, batch_size: int) -> dict:
    if not enc:
        return {}
    margins = torch.tensor([c - r for c, r in _score_groups(rm, enc, pad_id, batch_size)], dtype=torch.float64)
    acc = float((margins > 0).sum() + 0.5 * (margins == 0).sum()) / len(margins)
    return {"accuracy": acc, "margin": float(margins.mean()), "loss": float(-F.logsigmoid(margins).mean()),
            "pairs": len(enc)}


@torch.no_grad()
def _features(rm: RewardModel, groups: list[tuple[Encoded, ...]], pad_id: int, batch_size: int,
              on_batch: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """(N, K, F) the head's inputs for every reply (``RewardModel.features``; no grad);
    ``on_batch(done, total)`` after every batch of groups."""
    was_training = rm.lm.training
    rm.lm.eval()
    device = rm.head.weight.device
    order = sorted(range(len(groups)), key=lambda i: max(len(e) for e in groups[i]))  # less padding
    out: list[torch.Tensor | None] = [None] * len(groups)
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        g = collate_groups([groups[i] for i in idx], pad_id).to(device)
        h = rm.features(g).float()  # rows k * B + b
        per_group = h.view(g.replies_per_prompt, -1, h.shape[-1]).transpose(0, 1)
        for j, i in enumerate(idx):
            out[i] = per_group[j]
        if on_batch is not None:
            on_batch(min(s + batch_size, len(groups)), len(groups))
    rm.lm.train(was_training)
    return torch.stack(out)


def _fit_probe(d: torch.Tensor, l2: float) -> torch.Tensor:
    """argmin_w mean(-log sigmoid(d @ w)) + l2 * |w|^2 by L-BFGS (``d``: chosen - rejected features)."""
    w = torch.zeros(d.shape[1], dtype=torch.float64, device=d.device, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -F.logsigmoid(d @ w).mean() + l2 * w.dot(w)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def prompt_folds(enc: Sequence[tuple[Encoded, ...]], folds: int) -> torch.Tensor:
    """Each pair's cross-validation fold: pairs of one prompt share a fold (else a fold would be
    scored on prompts it was fitted on), prompts dealt round-robin in order of appearance."""
    seen: dict[tuple[int, ...], int] = {}
    return torch.tensor([seen.setdefault(tuple(group[0].prompt_ids), len(seen)) % folds for group in enc])


def choose_probe_l2(d: torch.Tensor, fold: torch.Tensor, grid: Sequence[float]) -> tuple[float, dict[float, float]]:
    """The l2 of ``grid`` whose probes, fitted without each fold, give the lowest Bradley-Terry
    loss on it (pooled over the folds); and every candidate's loss."""
    losses = {}
    for l2 in grid:
        held = [-F.logsigmoid(d[fold == k] @ _fit_probe(d[fold != k], l2)) for k in fold.unique().tolist()]
        losses[l2] = float(torch.cat(held).mean())
    return min(losses, key=losses.get), losses


def warm_start_head(rm: RewardModel, enc: list[tuple[Encoded, Encoded]], pad_id: int, l2: float,
                    batch_size: int = 8, on_batch: Callable[[int, int], None] | None = None,
                    l2_grid: Sequence[float] = (), folds: int = 5) -> dict[str, float]:
    """Linear probing before fine-tuning (LP-FT, Kumar et al. 2022): fit the head alone, by L-BFGS,
    to the Bradley-Terry loss on the frozen model's states, ``mean(-log sigmoid(w . (h_c - h_r)))
    + l2 * |w|^2``; fine-tuning then starts from a head that already ranks pairs instead of one
    that first has to find a direction while the LoRA chases a zero signal. Costs one forward pass
    over the training pairs (``on_batch(done, total)`` reports it). With ``l2_grid`` and pairs of
    at least ``2 * folds`` prompts, ``l2`` is chosen from the grid by cross-validation
    (``choose_probe_l2``): the probe has more inputs than the pairs it learns from, and an l2 too
    small fits them by heart."""
    feats = _features(rm, enc, pad_id, batch_size, on_batch).double()
    d = feats[:, 0] - feats[:, 1]
    cv: dict[float, float] = {}
    if l2_grid and folds >= 2 and len({tuple(g[0].prompt_ids) for g in enc}) >= 2 * folds:
        l2, cv = choose_probe_l2(d, prompt_folds(enc, folds), l2_grid)
    w = _fit_probe(d, l2)
    with torch.no_grad():
        rm.head.weight.copy_(w.to(rm.head.weight.dtype)[None])
        margins = d @ w
        out = {"probe_accuracy": float((margins > 0).double().mean()),
               "probe_loss": float(-F.logsigmoid(margins).mean()), "probe_l2": l2}
        if cv:
            out["probe_cv_loss"] = cv[l2]
        return out


PROBE_PHASE = "reward probe"  # progress lines of the head's warm start name this phase


def train_reward(
    rm: RewardModel,
    tokenizer,
    pairs: list[dict],
    eval_pairs: list[dict],
    cfg: RewardConfig,
    thumbs: list[dict] = (),
    on_step: Callable[[dict], None] = lambda m: None,
    should_stop: Callable[[], bool] = lambda: False,
) -> dict:
    """Fit LoRA + head on pairs (and, with pointwise_weight > 0, on thumbs {prompt, completion, label});
    with ``cfg.epochs == 0`` the head alone, by the probe (thumbs are then not used)."""
    if cfg.epochs == 0 and not cfg.head_warm_start:
        raise ValueError("a reward model of 0 epochs is its probed head: head_warm_start must be on")
    device = rm.head.weight.device
    pad_id = tokenizer.pad_token_id
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    enc = encode_pairs(tokenizer, pairs, cfg)
    held = encode_pairs(tokenizer, eval_pairs, cfg)
    pointwise = [(encode_reply(tokenizer, t["prompt"], t["completion"], cfg.max_prompt_tokens, cfg.max_reply_tokens),
                  float(bool(t["label"]))) for t in thumbs] if cfg.pointwise_weight > 0 else []

    def probe_progress(done: int, total: int) -> None:  # its own phase: one forward pass over the pairs
        on_step({"phase": PROBE_PHASE, "step": done, "total": total, "elapsed_s": time.perf_counter() - t0})

    probe = (warm_start_head(rm, enc, pad_id, cfg.head_warm_start_l2, cfg.batch_size, probe_progress,
                             cfg.head_warm_start_l2_grid, cfg.head_warm_start_folds)
             if cfg.head_warm_start else {})

    def step(idx: list[int]):
        chunk = [enc[j] for j in idx]
        r = rm(collate_groups(chunk, pad_id).to(device))  # chosen and rejected share one prompt pass
        rc, rr = r[: len(chunk)], r[len(chunk):]
        loss = bradley_terry_loss(rc, rr, center_coefficient=cfg.center_coefficient)
        metrics = {"accuracy": float((rc > rr).float().mean()), "margin": float((rc - rr).detach().mean())}
        if pointwise:
            sample = [pointwise[j % len(pointwise)] for j in idx]
            s = rm(collate_groups([[e] for e, _ in sample], pad_id).to(device))
            target = torch.tensor([y for _, y in sample], device=device)
            point = F.binary_cross_entropy_with_logits(s.float(), target)
            loss = loss + cfg.pointwise_weight * point
            metrics["pointwise_loss"] = float(point.detach())
        return loss, metrics

    if cfg.epochs == 0:
        rm.eval()
        return {"algo": "reward", "steps": 0, "train_pairs": len(enc), "eval_pairs": len(eval_pairs),
                "first_loss": probe["probe_loss"], "final_loss": probe["probe_loss"],
                "train_accuracy_last_epoch": probe["probe_accuracy"],
                "held_out": _evaluate_encoded(rm, held, pad_id, cfg.batch_size), "selection": None, **probe,
                "train_s": time.perf_counter() - t0, "config": asdict(cfg), "history": []}
    selection = None
    if held and cfg.select_best:  # the starting point (the probed head) is scored, not assumed
        selection = HeldOutSelection.per_epoch(lambda: _evaluate_encoded(rm, held, pad_id, cfg.batch_size),
                                               len(enc), cfg.batch_size, cfg.evals_per_epoch, cfg.patience)
    history = fit(rm.lm, len(enc), cfg.batch_size, cfg.epochs, cfg.learning_rate, cfg.seed, step,
                  on_step, should_stop, extra_params=list(rm.head.parameters()),
                  extra_learning_rate=cfg.head_learning_rate,
                  lengths=[max(len(c), len(r)) for c, r in enc], selection=selection)
    rm.eval()
    last_epoch = [h for h in history if h["epoch"] == history[-1]["epoch"]]
    return {
        "algo": "reward", "steps": len(history), "train_pairs": len(enc), "eval_pairs": len(eval_pairs),
        "first_loss": history[0]["loss"], "final_loss": history[-1]["loss"],
        # the training pairs are not scored again: the last epoch's step accuracies say as much
        "train_accuracy_last_epoch": sum(h["accuracy"] for h in last_epoch) / len(last_epoch),
        "held_out": selection.best_metrics if selection else _evaluate_encoded(rm, held, pad_id, cfg.batch_size),
        "selection": selection.summary() if selection else None, **probe,
        "train_s": time.perf_counter() - t0, "config": asdict(cfg), "history": history,
    }
