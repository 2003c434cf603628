"""The store's core: the one DuckDB connection, its lock, the migrations, and the group-commit
writer's side (how queued writes are applied, one transaction per group).

Owns: ``StoreCore``, the base the store's parts (``writes``, ``reads``, ``runs``, ``console``)
are mixed into. Invariants: every statement runs under ``_lock``; a group that fails as a whole is
retried one write at a time, so one bad write cannot fail the writes it was grouped with.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Sequence

import duckdb

from chatloop.store.records import Forbidden, NotFound, _Statements, _Thumb, _Write, now
from chatloop.store.schema import MIGRATIONS
from chatloop.writer import GroupWriter


class StoreCore:
    """The single owner of the DuckDB file in this process."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._con = duckdb.connect(
            str(self.path),
            config={"enable_external_access": False, "autoinstall_known_extensions": False,
                    "autoload_known_extensions": False},
        )
        self._migrate()
        self._con.execute("SET lock_configuration = true")
        # messages, replies and feedback are written by one thread, in groups (see writer.py)
        self._writer = GroupWriter(self._apply_group)

    # ---- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        self._writer.close()
        with self._lock:
            self._con.close()

    @property
    def write_stats(self) -> tuple[int, int]:
        """(group commits, writes) of the writer so far: writes per commit shows the grouping."""
        return self._writer.groups, self._writer.writes

    # ---- the group-commit writer's side --------------------------------------------------------
    def _apply_group(self, ops: Sequence[_Write]) -> list[Any]:
        """Apply ``ops`` in one transaction; results (or the exception of each op) in order.

        If the transaction fails as a whole, each op is retried in a transaction of its own so
        that one bad write cannot fail the writes it was grouped with.
        """
        with self._lock:
            try:
                self._con.execute("BEGIN TRANSACTION")
                results = self._apply(ops)
                self._con.execute("COMMIT")
                return results
            except Exception as exc:  # noqa: BLE001 - isolated below
                self._con.execute("ROLLBACK")
                if len(ops) == 1:
                    return [exc]
            out: list[Any] = []
            for op in ops:
                try:
                    self._con.execute("BEGIN TRANSACTION")
                    out.append(self._apply([op])[0])
                    self._con.execute("COMMIT")
                except Exception as exc:  # noqa: BLE001 - this op's own failure
                    self._con.execute("ROLLBACK")
                    out.append(exc)
            return out

    def _apply(self, ops: Sequence[_Write]) -> list[Any]:
        results: list[Any] = [None] * len(ops)
        thumbs = [(i, op) for i, op in enumerate(ops) if isinstance(op, _Thumb)]
        if thumbs:
            for i, res in zip([i for i, _ in thumbs], self._insert_thumbs([op for _, op in thumbs])):
                results[i] = res
        for i, op in enumerate(ops):
            if isinstance(op, _Statements):
                cur = None
                for sql, params in op.statements:
                    cur = self._con.execute(sql, list(params))
                results[i] = op.result if op.result is not None else cur.fetchone()[0]
        return results

    def _insert_thumbs(self, thumbs: list[_Thumb]) -> list[Any]:
        """Validate and insert many thumbs with a few statements (the hot path of ingest)."""
        owners = dict(self._con.execute(
            "SELECT m.id, c.user_id FROM messages m JOIN generations g ON g.message_id = m.id"
            " JOIN conversations c ON c.id = m.conversation_id WHERE m.id IN (SELECT unnest(?))",
            [sorted({t.message_id for t in thumbs})]).fetchall())
        results: list[Any] = []
        rows = []
        for t in thumbs:
            if t.message_id not in owners:
                results.append(NotFound(f"unknown assistant message {t.message_id!r}"))
                continue
            if t.shown_only and t.user_id != owners[t.message_id]:
                results.append(Forbidden(f"you can only rate replies you were shown ({t.message_id} was "
                                         f"written for another user)"))
                continue
            rows.append((t, t.user_id or owners[t.message_id]))
            results.append(None)
        if not rows:
            return results
        created = now()
        self._con.execute("INSERT INTO users SELECT unnest(?), 'anonymous', ? ON CONFLICT DO NOTHING",
                          [sorted({u for _, u in rows}), created])
        ids = [r[0] for r in self._con.execute("SELECT nextval('feedback_seq') FROM range(?)",
                                               [len(rows)]).fetchall()]
        if len(rows) >= 32:  # a big group: one columnar insert (binding many ? costs ~0.15 ms/row)
            import pyarrow as pa

            batch = pa.table({
                "id": pa.array(ids, pa.int64()), "message_id": [t.message_id for t, _ in rows],
                "user_id": [u for _, u in rows], "rating": pa.array([t.rating for t, _ in rows], pa.int16()),
                "reason": pa.array([t.reason or None for t, _ in rows], pa.string()),
                "comment": pa.array([t.comment or None for t, _ in rows], pa.string()),
                "created_at": pa.array([created] * len(rows), pa.timestamp("us"))})
            self._con.register("_thumb_batch", batch)
            try:
                self._con.execute("INSERT INTO feedback_events (id, message_id, user_id, rating, reason, comment,"
                                  " created_at) SELECT * FROM _thumb_batch")
            finally:
                self._con.unregister("_thumb_batch")
            rows = []
        for start in range(0, len(rows), 500):
            chunk = rows[start:start + 500]
            params: list[Any] = []
            for fid, (t, user) in zip(ids[start:start + 500], chunk):
                params += [fid, t.message_id, user, t.rating, t.reason or None, t.comment or None, created]
            self._con.execute(
                "INSERT INTO feedback_events (id, message_id, user_id, rating, reason, comment, created_at)"
                " VALUES " + ", ".join(["(?, ?, ?, ?, ?, ?, ?)"] * len(chunk)), params)
        it = iter(ids)
        return [next(it) if r is None else r for r in results]

    def _migrate(self) -> None:
        with self._lock:
            self._con.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version INTEGER PRIMARY KEY, description VARCHAR, applied_at TIMESTAMP)"
            )
            done = {r[0] for r in self._con.execute("SELECT version FROM schema_migrations").fetchall()}
            for version, description, sql in MIGRATIONS:
                if version in done:
                    continue
                self._con.execute("BEGIN TRANSACTION")
                try:
                    self._con.execute(sql)
                    self._con.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)",
                                      [version, description, now()])
                    self._con.execute("COMMIT")
                except BaseException:
                    self._con.execute("ROLLBACK")
                    raise

    def schema_version(self) -> int:
        return self._one("SELECT max(version) FROM schema_migrations")[0]

    # ---- helpers -----------------------------------------------------------------------------
    def _one(self, sql: str, params: Sequence[Any] = ()) -> tuple | None:
        with self._lock:
            return self._con.execute(sql, list(params)).fetchone()

    def _all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self._lock:
            return self._con.execute(sql, list(params)).fetchall()

    def _dicts(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self._lock:
            cur = self._con.execute(sql, list(params))
            cols = [d[0] for d in cur.description]
            return [dict(zip(cols, row)) for row in cur.fetchall()]
