"""Feedback log -> training data: preference pairs, splits and snapshots.

Owns: turning stored A/B choices and thumbs into (prompt, chosen, rejected) pairs, the
per-user cap, leaving out outlier raters, the leak-free train/held-out split, and the snapshot files a training child reads.

Invariants:
- Only the latest vote of a user on a message (or on a pair of messages) counts.
- A/B: 'a' or 'b' makes a pair; 'tie' and 'both_bad' are kept in the log but never paired.
- Thumbs: within one context, every reply rated up (net over users) is paired with every reply
  rated down. A reply with net zero is not used.
- The split is by context: all pairs of one context fall on the same side, chosen by a hash of
  the context, so a context never leaks from training into held-out evaluation and the split is
  stable as the log grows.
- A snapshot lists exactly which feedback and comparison rows produced it.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from chatloop.store import Store


@dataclass
class Pair:
    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    source: str  # ab | thumbs
    context_hash: str
    user_id: str
    feedback_ids: list[int] = field(default_factory=list)
    comparison_ids: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PairSet:
    pairs: list[Pair]
    capped: int = 0  # pairs dropped by the per-user cap

    @property
    def feedback_ids(self) -> list[int]:
        return sorted({i for p in self.pairs for i in p.feedback_ids})

    @property
    def comparison_ids(self) -> list[int]:
        return sorted({i for p in self.pairs for i in p.comparison_ids})


def pairs_from_comparisons(rows: Iterable[dict[str, Any]]) -> list[Pair]:
    pairs = []
    for r in rows:
        if r["choice"] not in ("a", "b"):
            continue
        chosen, rejected = (r["reply_a"], r["reply_b"]) if r["choice"] == "a" else (r["reply_b"], r["reply_a"])
        if chosen == rejected:
            continue
        pairs.append(Pair(prompt=r["context"], chosen=chosen, rejected=rejected, source="ab",
                          context_hash=r["context_hash"], user_id=r["user_id"],
                          comparison_ids=[r["comparison_id"]]))
    return pairs


@dataclass
class Thumb:
    """One rated reply for KTO: desirable when its net vote is up."""

    prompt: list[dict[str, str]]
    completion: str
    label: bool
    context_hash: str
    user_id: str
    feedback_ids: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def net_thumbs(rows: Iterable[dict[str, Any]]) -> list[Thumb]:
    """One Thumb per reply whose votes (the latest per user) do not cancel out, in log order.

    The Thumb's user is the last one who voted in the winning direction.
    """
    by_message: dict[str, dict[str, Any]] = {}
    for r in rows:
        m = by_message.setdefault(r["message_id"], {"net": 0, "ids": [], "row": r, "users": {}})
        m["net"] += r["rating"]
        m["ids"].append(r["feedback_id"])
        m["users"][r["rating"]] = r["user_id"]
    return [Thumb(prompt=m["row"]["context"], completion=m["row"]["reply"], label=m["net"] > 0,
                  context_hash=m["row"]["context_hash"], user_id=m["users"][1 if m["net"] > 0 else -1],
                  feedback_ids=sorted(m["ids"]))
            for m in by_message.values() if m["net"] != 0]


def pairs_from_thumbs(thumbs: Iterable[Thumb]) -> list[Pair]:
    """Within each context, every reply rated up paired with every reply rated down."""
    by_context: dict[str, dict[bool, list[Thumb]]] = defaultdict(lambda: {True: [], False: []})
    for t in thumbs:
        by_context[t.context_hash][t.label].append(t)
    return [Pair(prompt=up.prompt, chosen=up.completion, rejected=down.completion, source="thumbs",
                 context_hash=ctx, user_id=up.user_id, feedback_ids=sorted(up.feedback_ids + down.feedback_ids))
            for ctx, groups in by_context.items() for up in groups[True] for down in groups[False]
            if up.completion != down.completion]


def cap_per_user(items: list, cap: int, caps: dict[str, int] | None = None) -> tuple[list, int]:
    """Keep at most ``cap`` items (pairs or thumbs) per user, the most recent ones; 0 means no cap.
    ``caps`` gives some users (API keys) a cap of their own (0 there: none of theirs)."""
    caps = caps or {}
    if cap <= 0 and not caps:
        return items, 0
    counts: dict[str, int] = defaultdict(int)
    kept = []
    for p in reversed(items):  # items are in log order: keep the newest
        limit = caps.get(p.user_id, cap if cap > 0 else None)
        if limit is None or counts[p.user_id] < limit:
            counts[p.user_id] += 1
            kept.append(p)
    kept.reverse()
    return kept, len(items) - len(kept)


def outlier_raters(store: Store, z: float, min_votes: int) -> set[str]:
    """Users whose A/B votes between versions disagree with everyone else's far more than chance
    (``chatloop.outliers``): no snapshot uses their pairs or thumbs."""
    from chatloop.outliers import outlier_users

    return outlier_users(store.user_version_votes(), z, min_votes) if z > 0 else set()


def unpaired_thumbs(store: Store, max_per_user: int = 0,
                    exclude_users: frozenset[str] | set[str] = frozenset()) -> tuple[list[Thumb], int]:
    """The rated replies KTO trains on, after the per-user cap; and how many the cap dropped."""
    thumbs = [th for th in net_thumbs(store.latest_thumbs()) if th.user_id not in exclude_users]
    return cap_per_user(thumbs, max_per_user, store.user_caps())


def merge_duplicates(pairs: list[Pair]) -> list[Pair]:
    """One pair per (context, chosen, rejected): an A/B choice and thumbs that say the same thing
    count once, with the ids of every row behind it."""
    merged: dict[tuple[str, str, str], Pair] = {}
    for p in pairs:
        key = (p.context_hash, p.chosen, p.rejected)
        if key in merged:
            m = merged[key]
            m.feedback_ids = sorted(set(m.feedback_ids) | set(p.feedback_ids))
            m.comparison_ids = sorted(set(m.comparison_ids) | set(p.comparison_ids))
        else:
            merged[key] = p
    return list(merged.values())


def build_pairs(store: Store, max_pairs_per_user: int = 0,
                exclude_users: frozenset[str] | set[str] = frozenset()) -> PairSet:
    pairs = merge_duplicates(pairs_from_comparisons(store.latest_comparisons())
                             + pairs_from_thumbs(net_thumbs(store.latest_thumbs())))
    pairs = [p for p in pairs if p.user_id not in exclude_users]
    pairs, capped = cap_per_user(pairs, max_pairs_per_user, store.user_caps())
    return PairSet(pairs=pairs, capped=capped)


def is_held_out(context_hash: str, eval_fraction: float) -> bool:
    """Stable, context-level assignment to the held-out side."""
    bucket = int(hashlib.sha256(("split:" + context_hash).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return bucket < eval_fraction


def split_by_context(items: list, eval_fraction: float, hold_out: bool) -> tuple[list, list]:
    """(train, held-out) of anything with a ``context_hash``; nothing is held out unless ``hold_out``.

    Deciding ``hold_out`` once per snapshot and applying it to pairs, thumbs and prompts alike
    keeps one context on one side for every kind of data.
    """
    if not hold_out or eval_fraction <= 0:
        return list(items), []
    def key(p: Any) -> str:
        return p["context_hash"] if isinstance(p, dict) else p.context_hash

    held = [p for p in items if is_held_out(key(p), eval_fraction)]
    return [p for p in items if not is_held_out(key(p), eval_fraction)], held


def enough_to_hold_out(n: int, eval_fraction: float, min_eval: int) -> bool:
    return eval_fraction > 0 and n * eval_fraction >= min_eval


def split_pairs(pairs: list, eval_fraction: float, min_eval_pairs: int) -> tuple[list, list]:
    """Split by context. With too few pairs for a meaningful held-out set, everything trains."""
    train, held = split_by_context(pairs, eval_fraction, enough_to_hold_out(len(pairs), eval_fraction, min_eval_pairs))
    if not train:  # a degenerate draw: never let the held-out side swallow everything
        return list(pairs), []
    return train, held


def write_jsonl(path: Path, items: Iterable[Any]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for p in items:
            fh.write(json.dumps(p.to_json() if hasattr(p, "to_json") else p, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def logged_prompts(store: Store) -> list[dict[str, Any]]:
    """Distinct logged contexts (oldest first) with their hash: the prompts PPO rolls out on."""
    return [{"prompt": c, "context_hash": h} for h, c in store.distinct_contexts()]
