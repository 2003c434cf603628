"""The promotion gate: decide whether a trained candidate adapter replaces the active one.

Owns: the verdict (promote or reject, with reasons) from a candidate's training metrics.

The reference (the active adapter) has implicit-reward margin 0 on every pair by construction,
so its preference accuracy is 0.5 (ties count half). A candidate is promoted when:
- its losses are finite, and
- on held-out pairs (contexts it never trained on), its preference accuracy is not worse than the
  reference's 0.5; when there are too few pairs for a held-out set, its loss on the training
  pairs must have fallen below the starting loss (it learned something, and nothing diverged).

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
    reasons: list[str] = []
    final = metrics.get("final_loss")
    if final is None or not math.isfinite(final):
        return Verdict(False, [f"training loss is not finite ({final})"])
    held = metrics.get("held_out") or {}
    if held.get("pairs"):
        acc = held["accuracy"]
        ok = acc >= REFERENCE_ACCURACY
        reasons.append(f"held-out preference accuracy {acc:.3f} on {held['pairs']} pairs "
                       f"{'>=' if ok else '<'} reference {REFERENCE_ACCURACY}")
        return Verdict(ok, reasons)
    train = metrics.get("train_eval") or {}
    first = metrics.get("first_loss")
    if not train or first is None:
        return Verdict(False, ["no evaluation metrics"])
    ok = train["loss"] < first
    reasons.append(f"no held-out pairs (too little feedback); training-pair loss {train['loss']:.4f} "
                   f"{'<' if ok else '>='} starting loss {first:.4f}, accuracy {train['accuracy']:.3f}")
    return Verdict(ok, reasons)
