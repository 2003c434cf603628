"""Ratings of adapter versions from blind A/B votes: Bradley-Terry with bootstrap intervals.

Owns: turning votes between replies of two different versions into one strength per version,
its confidence interval, and the rating history over time.

Invariants:
- A vote is (version of A, version of B, outcome): 'a' or 'b' is a win, 'tie' and 'both_bad'
  count as half a win for each side (neither reply was preferred). Votes between two replies
  of the same version say nothing about versions and are not used.
- Strengths are fitted by Hunter's MM algorithm for the Bradley-Terry likelihood
  P(i beats j) = p_i / (p_i + p_j). A weak prior (``prior`` virtual ties of every version
  against a virtual average opponent) keeps a version that has only won or only lost finite.
- Ratings are on the Elo scale: 1000 + 400 * log10(p_i / geometric mean of p), so a 400-point
  gap means 10:1 odds. Intervals are percentiles of refits on votes resampled with replacement.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

Vote = tuple[str, str, str]  # (version of reply A, version of reply B, choice)


@dataclass(frozen=True)
class Rating:
    version: str
    rating: float
    low: float  # bootstrap percentile interval
    high: float
    votes: int
    wins: float  # ties count half


def _tallies(votes: Sequence[Vote]) -> tuple[list[str], dict[tuple[str, str], float]]:
    """Versions, and wins[(i, j)] = how often i beat j (ties half each)."""
    wins: dict[tuple[str, str], float] = {}
    versions: set[str] = set()
    for a, b, choice in votes:
        if a == b:
            continue
        versions.update((a, b))
        if choice == "a":
            wins[(a, b)] = wins.get((a, b), 0.0) + 1.0
        elif choice == "b":
            wins[(b, a)] = wins.get((b, a), 0.0) + 1.0
        else:  # tie, both_bad
            wins[(a, b)] = wins.get((a, b), 0.0) + 0.5
            wins[(b, a)] = wins.get((b, a), 0.0) + 0.5
    return sorted(versions), wins


def bradley_terry(votes: Sequence[Vote], prior: float = 1.0, iterations: int = 500,
                  tol: float = 1e-10) -> dict[str, float]:
    """Maximum (penalized) likelihood strengths, normalized to a geometric mean of 1."""
    versions, wins = _tallies(votes)
    if not versions:
        return {}
    p = {v: 1.0 for v in versions}
    total_wins = {v: sum(w for (i, _), w in wins.items() if i == v) + prior / 2 for v in versions}
    games: dict[tuple[str, str], float] = {}
    for (i, j), w in wins.items():
        key = (i, j) if i < j else (j, i)
        games[key] = games.get(key, 0.0) + w
    for _ in range(iterations):
        new = {}
        for v in versions:
            denom = prior / (p[v] + 1.0)  # the virtual opponent has strength 1
            for (i, j), n in games.items():
                if v in (i, j):
                    denom += n / (p[i] + p[j])
            new[v] = total_wins[v] / denom if denom > 0 else p[v]
        if prior == 0:  # without the anchor only ratios are identified: fix the scale
            new = _normalized(new)
        done = max(abs(math.log(new[v] / p[v])) for v in versions) < tol
        p = new
        if done:
            break
    return _normalized(p)


def _normalized(p: dict[str, float]) -> dict[str, float]:
    scale = math.exp(sum(math.log(x) for x in p.values()) / len(p))
    return {v: x / scale for v, x in p.items()}


def elo(strength: float) -> float:
    return 1000.0 + 400.0 * math.log10(strength)


def rate(votes: Sequence[Vote], prior: float = 1.0, bootstrap: int = 200, seed: int = 0,
         confidence: float = 0.95) -> list[Rating]:
    """Ratings with bootstrap intervals, best first."""
    usable = [v for v in votes if v[0] != v[1]]
    point = bradley_terry(usable, prior)
    if not point:
        return []
    rng = random.Random(seed)
    samples: dict[str, list[float]] = {v: [] for v in point}
    for _ in range(bootstrap if len(usable) > 1 else 0):
        fit = bradley_terry([usable[rng.randrange(len(usable))] for _ in usable], prior, iterations=200)
        for v in point:
            samples[v].append(elo(fit[v]) if v in fit else elo(1.0))
    _, wins = _tallies(usable)
    out = []
    for v, s in point.items():
        xs = sorted(samples[v]) or [elo(s)]
        lo = xs[int((1 - confidence) / 2 * (len(xs) - 1))]
        hi = xs[int((1 + confidence) / 2 * (len(xs) - 1))]
        n = sum(1 for a, b, _ in usable if v in (a, b))
        out.append(Rating(v, elo(s), lo, hi, n, sum(w for (i, _), w in wins.items() if i == v)))
    return sorted(out, key=lambda r: -r.rating)


def history(timed_votes: Sequence[tuple[object, str, str, str]], points: int = 12,
            prior: float = 1.0) -> list[tuple[object, dict[str, float]]]:
    """Ratings (no intervals) after growing prefixes of the votes: [(time of the last vote used,
    {version: rating})], for a ratings-over-time plot. ``timed_votes`` are (time, a, b, choice),
    oldest first."""
    usable = [t for t in timed_votes if t[1] != t[2]]
    if not usable:
        return []
    cuts = sorted({max(1, round(len(usable) * k / points)) for k in range(1, points + 1)})
    out = []
    for c in cuts:
        fit = bradley_terry([(a, b, ch) for _, a, b, ch in usable[:c]], prior, iterations=200)
        out.append((usable[c - 1][0], {v: elo(s) for v, s in fit.items()}))
    return out
