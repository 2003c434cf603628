"""Exports of the feedback log for offline work: preference pairs, feedback events, conversations.

Owns: the row shape of each export and writing rows as JSON Lines or Parquet (pyarrow).

Invariants:
- Read-only: exports go through the store's typed reads, never through writes or files that
  DuckDB itself would open (the database has external access disabled).
- Pairs are exactly what a training snapshot builds (latest votes, duplicates merged, the
  per-user cap applied, outlier raters left out) and carry ``held_out``: whether the gate's context-hash split keeps
  that context out of training, so offline work can respect the same split.
- Timestamps are ISO-8601 strings (UTC) in both formats.
"""

from __future__ import annotations

import datetime as dt
import io
import json
from typing import Any

from chatloop import prefs
from chatloop.config import TrainingDefaults
from chatloop.store import Store

WHAT = ("pairs", "feedback", "conversations")
FORMATS = ("jsonl", "parquet")


def export_rows(store: Store, what: str, training: TrainingDefaults | None = None) -> list[dict[str, Any]]:
    t = training or TrainingDefaults()
    if what == "pairs":
        outliers = prefs.outlier_raters(store, t.outlier_z, t.outlier_min_votes)
        pairset = prefs.build_pairs(store, t.max_pairs_per_user, outliers)
        return [{**p.to_json(), "held_out": prefs.is_held_out(p.context_hash, t.eval_fraction)}
                for p in pairset.pairs]
    if what == "feedback":
        return store.all_feedback()
    if what == "conversations":
        return store.all_conversations()
    raise ValueError(f"unknown export {what!r}; use one of {', '.join(WHAT)}")


def _plain(v: Any) -> Any:
    if isinstance(v, dt.datetime):
        return v.isoformat()
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


def encode(rows: list[dict[str, Any]], fmt: str) -> bytes:
    """The rows as a JSON Lines or Parquet file's bytes."""
    rows = [_plain(r) for r in rows]
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buf)
        return buf.getvalue()
    raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
