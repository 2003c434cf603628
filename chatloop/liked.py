"""Is the bot getting better? The liked share of each version that served, from real users'
thumbs, with its interval, next to the gate's verdict on it: what an operator looks at first.

Owns: the Wilson score interval and the per-version table built from the store's tallies
(``Store.version_thumbs``), the activation log and the training runs. Invariants: a version's
share counts the latest thumb of each user on each reply it wrote, never imported rows; versions
come in the order they first served (base first), and a candidate that never served is listed
with its verdict and no share.
"""

from __future__ import annotations

import json
import math
from typing import Any, Sequence

from chatloop.adapters import BASE_VERSION
from chatloop.evaluate import Verdict


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (0, 1 when there is nothing to count)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _failed_reasons(run: dict[str, Any]) -> str:
    """The reasons of the checks a run's candidate failed (from its structured verdict)."""
    gate = run.get("checks")
    try:
        v = Verdict.from_dict(json.loads(gate) if isinstance(gate, str) else gate or {})
    except (ValueError, TypeError, KeyError):
        return ""
    return "; ".join(c.reason for c in v.results if c.passed is False)


def liked_by_version(tallies: Sequence[dict[str, Any]], first_served: dict[str, Any],
                     runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per version: ``version``, ``served_from`` (first activation; None for base),
    ``thumbs``, ``liked_pct`` with ``low_pct``/``high_pct`` (95 %), and the gate's ``gate``
    (run status), ``run_id`` and ``why`` (the failed checks) for versions a run produced.

    ``tallies`` are rows of (version, up, down); ``first_served`` maps a version to the time it
    first became active; ``runs`` are training-run rows (id, candidate_version, status, and
    ``checks``: the structured verdict as ``Verdict.as_dict`` gives it).
    """
    by_version = {t["version"]: t for t in tallies}
    first_served = {v: t for v, t in first_served.items() if v != BASE_VERSION}  # base serves from the start
    made = {r["candidate_version"]: r for r in sorted(runs, key=lambda r: r["id"]) if r.get("candidate_version")}
    versions = set(by_version) | set(first_served) | set(made) | {BASE_VERSION}

    def order(v: str) -> tuple:
        if v == BASE_VERSION:
            return (0, "")
        served = first_served.get(v)
        return (1, str(served)) if served is not None else (2, str(made.get(v, {}).get("id", 0)).zfill(9))

    rows = []
    for v in sorted(versions, key=order):
        t = by_version.get(v, {"up": 0, "down": 0})
        n = int(t["up"]) + int(t["down"])
        lo, hi = wilson(int(t["up"]), n)
        run = made.get(v)
        rows.append({
            "version": v, "served_from": first_served.get(v), "thumbs": n,
            "liked_pct": round(100 * int(t["up"]) / n, 1) if n else None,
            "low_pct": round(100 * lo, 1) if n else None, "high_pct": round(100 * hi, 1) if n else None,
            "gate": run["status"] if run else ("the base model" if v == BASE_VERSION else "activated by hand"),
            "run_id": run["id"] if run else None,
            "why": _failed_reasons(run) if run else "",
        })
    return rows
