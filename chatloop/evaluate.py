"""The promotion gate: decide whether a trained candidate adapter replaces the active one.

Owns: the verdict (promote or reject, with reasons) from a candidate's training metrics.

The reference (the active adapter) has implicit-reward margin 0 on every pair by construction,
so its preference accuracy is 0.5 (ties count half). A candidate is promoted when:
- its losses are finite, and
- DPO/KTO: on held-out data (contexts it never trained on), its preference accuracy (KTO: the
  share of replies whose implicit reward has the thumb's sign) is not worse than the reference's
  0.5; with too little data for a held-out set, its training loss must have fallen below the
  starting loss (it learned something, and nothing diverged);
- PPO: the reward model scores its replies on held-out prompts at least as high as the
  reference's (same prompts, same sampling seed).

Invariant: the verdict and every reason are returned for the caller to store; nothing here
activates anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

REFERENCE_ACCURACY = 0.5


@dataclass
class Verdict:
    promote: bool
    reasons: list[str] = field(default_factory=list)

    @property
    def summary(self) -> str:
        return ("promoted: " if self.promote else "rejected: ") + "; ".join(self.reasons)


def gate(metrics: dict[str, Any]) -> Verdict:
    final = metrics.get("final_loss")
    if final is None or not math.isfinite(final):
        return Verdict(False, [f"training loss is not finite ({final})"])
    if metrics.get("algo") == "ppo":
        return _gate_ppo(metrics)
    held = metrics.get("held_out") or {}
    n = held.get("pairs") or held.get("examples")
    if n:
        acc = held["accuracy"]
        ok = acc >= REFERENCE_ACCURACY
        what = "preference" if held.get("pairs") else "thumb-sign"
        return Verdict(ok, [f"held-out {what} accuracy {acc:.3f} on {n} {'pairs' if held.get('pairs') else 'replies'} "
                            f"{'>=' if ok else '<'} reference {REFERENCE_ACCURACY}"])
    train = metrics.get("train_eval") or {}
    first = metrics.get("first_loss")
    if not train or first is None:
        return Verdict(False, ["no evaluation metrics"])
    ok = train["loss"] < first
    return Verdict(ok, [f"no held-out data (too little feedback); training loss {train['loss']:.4f} "
                        f"{'<' if ok else '>='} starting loss {first:.4f}, accuracy {train['accuracy']:.3f}"])


def _gate_ppo(metrics: dict[str, Any]) -> Verdict:
    """PPO: the reward model must score the candidate's replies at least as high as the reference's."""
    ev = metrics.get("reward_eval") or {}
    if not ev.get("prompts"):
        return Verdict(False, ["no reward-model evaluation of the candidate"])
    ok = ev["policy"] >= ev["reference"]
    return Verdict(ok, [f"reward model: candidate {ev['policy']:.3f} {'>=' if ok else '<'} reference "
                        f"{ev['reference']:.3f} on {ev['prompts']} prompts (win rate {ev['win_rate']:.2f}), "
                        f"KL to reference {metrics.get('final_kl', float('nan')):.3f}"])
