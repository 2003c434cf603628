"""The feedback log: one DuckDB file, its schema and migrations, and every read and write of it.

Owns: the only connection to ``chatloop.duckdb`` in a process, the versioned schema
(``schema_migrations``), typed record/query functions, and the read-only SQL console.

Invariants:
- One process owns the file; inside it all access goes through a ``Store`` and one lock.
  Messages, replies, thumbs and A/B votes are written by the group-commit writer
  (``chatloop.writer``): concurrent writes share a transaction, each call returns only after
  its transaction committed (durable when acknowledged), and a write that spans rows (a reply
  and its generation record) is never split, so a failure leaves nothing half-written.
- Feedback and comparisons are append-only events: a changed vote is a new row and the latest
  row per (user, message) counts. Nothing here deletes or rewrites user data.
- The database is opened with external access disabled and its configuration locked, so SQL
  (the console's included) can read no file, fetch no URL, load no extension; exports are written
  by Python from query results.
- Every assistant message has a ``generations`` row naming the adapter version ('base' when none).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import duckdb

from chatloop.errors import ChatloopError
from chatloop.writer import GroupWriter

BASE_VERSION = "base"

MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "initial schema",
        """
        CREATE TABLE users (
            id VARCHAR PRIMARY KEY,
            kind VARCHAR NOT NULL,            -- anonymous | api | import
            created_at TIMESTAMP NOT NULL
        );
        CREATE TABLE conversations (
            id VARCHAR PRIMARY KEY,
            user_id VARCHAR NOT NULL,
            source VARCHAR NOT NULL,          -- ui | api | compare | import
            created_at TIMESTAMP NOT NULL
        );
        CREATE TABLE messages (
            id VARCHAR PRIMARY KEY,
            conversation_id VARCHAR NOT NULL,
            role VARCHAR NOT NULL,            -- system | user | assistant
            content VARCHAR NOT NULL,
            created_at TIMESTAMP NOT NULL
        );
        CREATE TABLE generations (
            message_id VARCHAR PRIMARY KEY,   -- the assistant message
            context JSON NOT NULL,            -- the chat messages the reply answers
            context_hash VARCHAR NOT NULL,    -- groups replies to the same context
            model VARCHAR NOT NULL,
            adapter_version VARCHAR NOT NULL, -- 'base' or a registry version
            settings JSON NOT NULL,
            prompt_tokens INTEGER NOT NULL,
            completion_tokens INTEGER NOT NULL,
            ttft_ms DOUBLE,
            latency_ms DOUBLE NOT NULL,
            finish_reason VARCHAR NOT NULL,
            created_at TIMESTAMP NOT NULL
        );
        CREATE SEQUENCE feedback_seq;
        CREATE TABLE feedback_events (
            id BIGINT PRIMARY KEY DEFAULT nextval('feedback_seq'),
            message_id VARCHAR NOT NULL,
            user_id VARCHAR NOT NULL,
            rating SMALLINT NOT NULL CHECK (rating IN (-1, 1)),
            reason VARCHAR,
            comment VARCHAR,
            created_at TIMESTAMP NOT NULL
        );
        CREATE SEQUENCE comparison_seq;
        CREATE TABLE comparisons (
            id BIGINT PRIMARY KEY DEFAULT nextval('comparison_seq'),
            message_a VARCHAR NOT NULL,
            message_b VARCHAR NOT NULL,
            choice VARCHAR NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'both_bad')),
            user_id VARCHAR NOT NULL,
            created_at TIMESTAMP NOT NULL
        );
        CREATE SEQUENCE run_seq;
        CREATE TABLE training_runs (
            id BIGINT PRIMARY KEY DEFAULT nextval('run_seq'),
            algo VARCHAR NOT NULL,
            trigger VARCHAR NOT NULL,         -- cli | api | ui | <kind>:schedule-N | manual:schedule-N
            status VARCHAR NOT NULL,          -- chatloop.run_status.RunStatus: running | refused | failed | rejected | staged | promoted | overridden
            started_at TIMESTAMP NOT NULL,
            finished_at TIMESTAMP,
            parent_version VARCHAR NOT NULL,
            candidate_version VARCHAR,
            snapshot_dir VARCHAR,
            n_pairs INTEGER,
            n_eval_pairs INTEGER,
            feedback_ids JSON,                -- exactly which rows trained it
            comparison_ids JSON,
            settings JSON,
            metrics JSON,
            verdict VARCHAR,
            error VARCHAR
        );
        CREATE TABLE adapters (
            version VARCHAR PRIMARY KEY,
            parent VARCHAR NOT NULL,
            algo VARCHAR NOT NULL,
            run_id BIGINT,
            path VARCHAR NOT NULL,
            metrics JSON,
            created_at TIMESTAMP NOT NULL
        );
        CREATE SEQUENCE activation_seq;
        CREATE TABLE adapter_activations (
            id BIGINT PRIMARY KEY DEFAULT nextval('activation_seq'),
            version VARCHAR NOT NULL,
            previous VARCHAR NOT NULL,
            actor VARCHAR NOT NULL,           -- gate | operator | rollback | startup
            reason VARCHAR,
            activated_at TIMESTAMP NOT NULL
        );
        CREATE INDEX generations_context ON generations(context_hash);
        CREATE INDEX feedback_message ON feedback_events(message_id);
        """,
    ),
    (
        2,
        "retraining schedules",
        """
        CREATE SEQUENCE schedule_seq;
        CREATE TABLE schedules (
            id BIGINT PRIMARY KEY DEFAULT nextval('schedule_seq'),
            kind VARCHAR NOT NULL,            -- cron | interval | feedback
            spec VARCHAR NOT NULL,            -- crontab line | minutes | number of new events
            algo VARCHAR NOT NULL,            -- dpo | kto | ppo
            created_at TIMESTAMP NOT NULL,
            created_by VARCHAR NOT NULL,
            feedback_mark BIGINT NOT NULL,    -- feedback_count() when it last fired (or was made)
            last_fired_at TIMESTAMP,
            last_run_id BIGINT
        );
        ALTER TABLE training_runs ADD COLUMN override VARCHAR;  -- who promoted a rejected run, and why
        """,
    ),
    (
        3,
        "imported conversations: their origin, and a held-out mark that keeps them out of training",
        """
        ALTER TABLE conversations ADD COLUMN external_id VARCHAR;  -- e.g. oasst:<message id>, hh:<line>
        ALTER TABLE conversations ADD COLUMN held_out BOOLEAN NOT NULL DEFAULT false;
        CREATE INDEX conversations_external ON conversations(external_id);
        """,
    ),
    (
        4,
        "API keys an operator issues: the key is the caller's identity, with its own limits and cap",
        """
        CREATE TABLE api_keys (
            id VARCHAR PRIMARY KEY,           -- the public part of the key: clk_<id>_<secret>
            name VARCHAR NOT NULL,
            secret_sha256 VARCHAR NOT NULL,   -- the secret itself is shown once and never stored
            created_at TIMESTAMP NOT NULL,
            revoked_at TIMESTAMP,
            chat_per_minute INTEGER,          -- NULL: the service's [limits]
            feedback_per_minute INTEGER,
            max_pairs INTEGER                 -- NULL: [training] max_pairs_per_user
        );
        """,
    ),
]

READ_ONLY_STATEMENTS = {"SELECT", "EXPLAIN"}
# query nodes a read may contain (a DELETE/INSERT/UPDATE ... RETURNING inside a CTE is a SELECT
# statement to DuckDB, but its parse tree names the writing node), and functions that change state
# outside the transaction that the console rolls back
_READ_NODES = {"SELECT_NODE", "SET_OPERATION_NODE", "RECURSIVE_CTE_NODE", "CTE_NODE"}
_STATEFUL_FUNCTIONS = {"nextval", "setval", "currval"}
_EXPLAIN = re.compile(r"^\s*EXPLAIN(\s+ANALY[SZ]E)?\s+", re.IGNORECASE)


class StoreError(ChatloopError, ValueError):
    """A request refers to something that does not exist or breaks a rule of the log."""


class NotFound(StoreError):
    status, type = 404, "not_found_error"


class SqlRefused(StoreError):
    type = "sql_refused"


class Forbidden(StoreError):
    """The user may not do this to that row (e.g. rate a reply they were never shown)."""
    status, type = 403, "permission_error"


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:20]}"


def context_hash(context: Sequence[dict[str, str]]) -> str:
    """A stable key for 'the same context': role and content of every message, in order."""
    canon = json.dumps([[m["role"], m["content"]] for m in context], ensure_ascii=False)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()[:32]


@dataclass(frozen=True)
class GenerationRecord:
    context: list[dict[str, str]]
    reply: str
    model: str
    adapter_version: str
    settings: dict[str, Any]
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float | None
    latency_ms: float
    finish_reason: str


# Every thumb and A/B vote as one row shape (the feedback export and the Admin tab's browser).
_FEEDBACK_EVENTS = """
    SELECT 'thumb' AS kind, f.id, f.created_at, f.user_id, f.message_id, NULL AS message_b,
           f.rating, NULL AS choice, f.reason, f.comment, g.adapter_version,
           NULL AS adapter_version_b, g.context, m.content AS reply, NULL AS reply_b
    FROM feedback_events f
    JOIN messages m ON m.id = f.message_id
    LEFT JOIN generations g ON g.message_id = f.message_id
    UNION ALL
    SELECT 'ab', c.id, c.created_at, c.user_id, c.message_a, c.message_b, NULL, c.choice, NULL, NULL,
           ga.adapter_version, gb.adapter_version, ga.context, ma.content, mb.content
    FROM comparisons c
    JOIN messages ma ON ma.id = c.message_a
    JOIN messages mb ON mb.id = c.message_b
    LEFT JOIN generations ga ON ga.message_id = c.message_a
    LEFT JOIN generations gb ON gb.message_id = c.message_b
"""

# The vote that counts: the latest of each user on each unordered pair of replies.
_LATEST_VOTE_PER_USER_AND_PAIR = """
    QUALIFY row_number() OVER (
        PARTITION BY c.user_id, least(c.message_a, c.message_b), greatest(c.message_a, c.message_b)
        ORDER BY c.created_at DESC, c.id DESC) = 1
"""


@dataclass(frozen=True)
class _Thumb:
    """A thumb for the group-commit writer (validated inside its group's transaction)."""

    message_id: str
    user_id: str | None
    rating: int
    reason: str | None
    comment: str | None
    shown_only: bool = False  # refuse (Forbidden) unless the reply was written for user_id


@dataclass(frozen=True)
class _Statements:
    """Statements for the writer; the op's result is ``result``, else the last statement's
    first returned value."""

    statements: list[tuple[str, Sequence[Any]]]
    result: Any = None


_Write = _Thumb | _Statements


@dataclass(frozen=True)
class SqlResult:
    columns: list[str]
    rows: list[tuple]
    truncated: bool


class Store:
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

    def _transaction(self, statements: Iterable[tuple[str, Sequence[Any]]]) -> None:
        with self._lock:
            self._con.execute("BEGIN TRANSACTION")
            try:
                for sql, params in statements:
                    self._con.execute(sql, list(params))
                self._con.execute("COMMIT")
            except BaseException:
                self._con.execute("ROLLBACK")
                raise

    # ---- users and conversations -------------------------------------------------------------
    def ensure_user(self, user_id: str, kind: str = "anonymous") -> str:
        with self._lock:
            self._con.execute(
                "INSERT INTO users VALUES (?, ?, ?) ON CONFLICT DO NOTHING", [user_id, kind, now()]
            )
        return user_id

    def new_conversation(self, user_id: str, source: str, external_id: str | None = None,
                         held_out: bool = False) -> str:
        """A new conversation; imported ones name their origin (``external_id``) and may be held
        out, which keeps every reply and vote in them out of training snapshots."""
        cid = new_id("conv")
        self.ensure_user(user_id, {"api": "api", "import": "import"}.get(source, "anonymous"))
        with self._lock:
            self._con.execute("INSERT INTO conversations (id, user_id, source, created_at, external_id, held_out)"
                              " VALUES (?, ?, ?, ?, ?, ?)", [cid, user_id, source, now(), external_id, held_out])
        return cid

    def imported_ids(self, prefix: str) -> set[str]:
        """External ids already imported that start with ``prefix`` (imports are idempotent)."""
        return {r[0] for r in self._all("SELECT external_id FROM conversations WHERE starts_with(external_id, ?)",
                                        [prefix])}

    def conversation_owner(self, conversation_id: str) -> str:
        row = self._one("SELECT user_id FROM conversations WHERE id = ?", [conversation_id])
        if row is None:
            raise NotFound(f"unknown conversation {conversation_id!r}")
        return row[0]

    # ---- replies -----------------------------------------------------------------------------
    def record_exchange(self, conversation_id: str, rec: GenerationRecord,
                        message_id: str | None = None) -> str:
        """Store the user's last message and the assistant reply with its generation record.

        One transaction: either all three rows land or none. Returns the assistant message id.
        """
        t = now()
        msg_id = message_id or new_id("msg")
        stmts: list[tuple[str, Sequence[Any]]] = []
        last = rec.context[-1] if rec.context else None
        if last is not None and last["role"] == "user":
            stmts.append(("INSERT INTO messages VALUES (?, ?, 'user', ?, ?)",
                          [new_id("msg"), conversation_id, last["content"], t]))
        stmts.append(("INSERT INTO messages VALUES (?, ?, 'assistant', ?, ?)",
                      [msg_id, conversation_id, rec.reply, t]))
        stmts.append((
            "INSERT INTO generations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [msg_id, json.dumps(rec.context, ensure_ascii=False), context_hash(rec.context),
             rec.model, rec.adapter_version, json.dumps(rec.settings), rec.prompt_tokens,
             rec.completion_tokens, rec.ttft_ms, rec.latency_ms, rec.finish_reason, t],
        ))
        return self._writer.submit(_Statements(stmts, msg_id))

    def assistant_message(self, message_id: str) -> dict[str, Any]:
        rows = self._dicts(
            "SELECT m.id, m.content, m.conversation_id, c.user_id, g.context, g.context_hash,"
            " g.adapter_version FROM messages m JOIN generations g ON g.message_id = m.id"
            " JOIN conversations c ON c.id = m.conversation_id WHERE m.id = ?",
            [message_id],
        )
        if not rows:
            raise NotFound(f"unknown assistant message {message_id!r}")
        row = rows[0]
        row["context"] = json.loads(row["context"])
        return row

    # ---- feedback ----------------------------------------------------------------------------
    def record_feedback(self, message_id: str, user_id: str | None, rating: int,
                        reason: str | None = None, comment: str | None = None, shown_only: bool = False) -> int:
        """Append a thumb; ``user_id`` None means the user the reply was written for. With
        ``shown_only`` a thumb from anyone else is refused (Forbidden): the public paths use it,
        imports and tests that simulate many raters do not."""
        if rating not in (1, -1):
            raise StoreError("rating must be 1 (thumbs up) or -1 (thumbs down)")
        # validated, inserted and committed by the writer, grouped with concurrent thumbs
        return int(self._writer.submit(_Thumb(message_id, user_id, rating, reason, comment, shown_only)))

    def record_comparison(self, message_a: str, message_b: str, choice: str, user_id: str | None,
                          shown_only: bool = False) -> int:
        """Append an A/B choice; ``user_id`` None means the user the replies were written for.
        With ``shown_only`` a vote by anyone else is refused (Forbidden), as for thumbs."""
        if choice not in ("a", "b", "tie", "both_bad"):
            raise StoreError("choice must be one of 'a', 'b', 'tie', 'both_bad'")
        if message_a == message_b:
            raise StoreError("message_a and message_b must be two different replies")
        a = self.assistant_message(message_a)
        b = self.assistant_message(message_b)
        if shown_only:
            for m in (a, b):
                if m["user_id"] != user_id:
                    raise Forbidden(f"you can only rate replies you were shown ({m['id']} was written for "
                                    f"another user)")
        if a["context_hash"] != b["context_hash"]:
            raise StoreError("message_a and message_b must answer the same context")
        user_id = user_id or a["user_id"]
        t = now()
        return int(self._writer.submit(_Statements([
            ("INSERT INTO users VALUES (?, 'anonymous', ?) ON CONFLICT DO NOTHING", [user_id, t]),
            ("INSERT INTO comparisons (message_a, message_b, choice, user_id, created_at)"
             " VALUES (?, ?, ?, ?, ?) RETURNING id", [message_a, message_b, choice, user_id, t]),
        ])))

    def latest_thumbs(self) -> list[dict[str, Any]]:
        """The latest thumb of each (user, message), with the reply and its context; replies in
        held-out (imported) conversations are left out: they never train."""
        rows = self._dicts(
            """
            SELECT f.id AS feedback_id, f.message_id, f.user_id, f.rating, f.reason,
                   m.content AS reply, g.context, g.context_hash, g.adapter_version
            FROM feedback_events f
            JOIN messages m ON m.id = f.message_id
            JOIN generations g ON g.message_id = f.message_id
            JOIN conversations cv ON cv.id = m.conversation_id
            WHERE NOT cv.held_out
            QUALIFY row_number() OVER (PARTITION BY f.user_id, f.message_id
                                       ORDER BY f.created_at DESC, f.id DESC) = 1
            ORDER BY f.id
            """
        )
        for r in rows:
            r["context"] = json.loads(r["context"])
        return rows

    def latest_comparisons(self) -> list[dict[str, Any]]:
        """The latest choice of each user on each unordered pair of replies (none from held-out
        conversations)."""
        rows = self._dicts(
            f"""
            SELECT c.id AS comparison_id, c.user_id, c.choice, c.message_a, c.message_b,
                   ma.content AS reply_a, mb.content AS reply_b, g.context, g.context_hash
            FROM comparisons c
            JOIN messages ma ON ma.id = c.message_a
            JOIN messages mb ON mb.id = c.message_b
            JOIN generations g ON g.message_id = c.message_a
            JOIN conversations cv ON cv.id = ma.conversation_id
            WHERE NOT cv.held_out
            {_LATEST_VOTE_PER_USER_AND_PAIR}
            ORDER BY c.id
            """
        )
        for r in rows:
            r["context"] = json.loads(r["context"])
        return rows

    def all_feedback(self) -> list[dict[str, Any]]:
        """Every thumb and every A/B vote (append-only history, not just the latest), oldest first,
        with the rated replies, their context and the adapter version that wrote them."""
        rows = self._dicts(f"WITH fb AS ({_FEEDBACK_EVENTS}) SELECT * FROM fb ORDER BY created_at, kind, id")
        for r in rows:
            r["context"] = json.loads(r["context"]) if r["context"] else None
        return rows

    def browse_feedback(self, kind: str = "all", version: str | None = None, user: str | None = None,
                        since: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        """Newest feedback first, filtered: kind all | up | down | A/B, the adapter version that
        wrote the rated reply (either side for A/B), the user, and a start date (YYYY-MM-DD)."""
        where, params = [], []
        if kind in ("up", "down"):
            where.append("kind = 'thumb' AND rating = ?")
            params.append(1 if kind == "up" else -1)
        elif kind == "A/B":
            where.append("kind = 'ab'")
        elif kind != "all":
            raise StoreError(f"unknown feedback kind {kind!r}; use all, up, down or A/B")
        if version:
            where.append("(adapter_version = ? OR adapter_version_b = ?)")
            params += [version, version]
        if user:
            where.append("user_id = ?")
            params.append(user)
        if since:
            try:
                params.append(dt.datetime.strptime(since, "%Y-%m-%d"))
            except ValueError:
                raise StoreError(f"since must be a date like 2026-01-31 (got {since!r})") from None
            where.append("created_at >= ?")
        rows = self._dicts(
            f"WITH fb AS ({_FEEDBACK_EVENTS}) SELECT * FROM fb {'WHERE ' + ' AND '.join(where) if where else ''}"
            " ORDER BY created_at DESC, id DESC LIMIT ?", params + [max(1, min(limit, 5000))])
        for r in rows:
            ctx = json.loads(r.pop("context")) if r.get("context") else []
            r["prompt"] = ctx[-1]["content"] if ctx else None
            if r["kind"] == "ab":
                r["reply"] = f"{r['reply']}  ⟷  {r['reply_b']}"
        return rows

    def all_conversations(self) -> list[dict[str, Any]]:
        """Every conversation with its messages in order (assistant messages carry their adapter)."""
        convs = self._dicts("SELECT id, user_id, source, created_at FROM conversations ORDER BY created_at, id")
        msgs = self._dicts(
            "SELECT m.conversation_id, m.id, m.role, m.content, m.created_at, g.adapter_version"
            " FROM messages m LEFT JOIN generations g ON g.message_id = m.id ORDER BY m.created_at, m.id")
        by_conv: dict[str, list[dict[str, Any]]] = {}
        for m in msgs:
            by_conv.setdefault(m.pop("conversation_id"), []).append(m)
        for c in convs:
            c["messages"] = by_conv.get(c["id"], [])
        return convs

    def version_votes(self) -> list[tuple[Any, str, str, str]]:
        """(time, version of A, version of B, choice) of the latest vote of each user on each pair
        of replies, oldest first: what adapter ratings are fitted on."""
        return self._version_votes("c.created_at")

    def user_version_votes(self) -> list[tuple[str, str, str, str]]:
        """(user, version of A, version of B, choice), as ``version_votes``: what the outlier-rater
        test reads (``chatloop.outliers``)."""
        return self._version_votes("c.user_id")

    def _version_votes(self, first_column: str) -> list[tuple[Any, str, str, str]]:
        return [tuple(r) for r in self._all(
            f"""
            SELECT {first_column}, ga.adapter_version, gb.adapter_version, c.choice
            FROM comparisons c
            JOIN generations ga ON ga.message_id = c.message_a
            JOIN generations gb ON gb.message_id = c.message_b
            {_LATEST_VOTE_PER_USER_AND_PAIR}
            ORDER BY c.created_at, c.id
            """)]

    def distinct_contexts(self, limit: int = 10000) -> list[tuple[str, list[dict[str, str]]]]:
        """(context_hash, context) of every distinct context that got a reply outside held-out
        conversations, oldest first."""
        rows = self._all("SELECT g.context_hash, any_value(g.context) FROM generations g"
                         " JOIN messages m ON m.id = g.message_id JOIN conversations cv ON cv.id = m.conversation_id"
                         " WHERE NOT cv.held_out GROUP BY g.context_hash ORDER BY min(g.created_at) LIMIT ?", [limit])
        return [(h, json.loads(c)) for h, c in rows]

    def feedback_count(self) -> int:
        """Thumbs plus A/B votes that can train: events on held-out (imported) conversations are
        not counted, so importing an evaluation split never fires a feedback schedule."""
        return self._one(
            """
            SELECT (SELECT count(*) FROM feedback_events f
                    JOIN messages m ON m.id = f.message_id
                    JOIN conversations cv ON cv.id = m.conversation_id WHERE NOT cv.held_out)
                 + (SELECT count(*) FROM comparisons c
                    JOIN messages m ON m.id = c.message_a
                    JOIN conversations cv ON cv.id = m.conversation_id WHERE NOT cv.held_out)
            """)[0]

    # ---- retraining schedules ----------------------------------------------------------------
    def add_schedule(self, kind: str, spec: str, algo: str, created_by: str) -> int:
        row = self._one(
            "INSERT INTO schedules (kind, spec, algo, created_at, created_by, feedback_mark)"
            " VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
            [kind, spec, algo, now(), created_by, self.feedback_count()])
        return int(row[0])

    def list_schedules(self) -> list[dict[str, Any]]:
        return self._dicts("SELECT * FROM schedules ORDER BY id")

    def get_schedule(self, schedule_id: int) -> dict[str, Any]:
        rows = self._dicts("SELECT * FROM schedules WHERE id = ?", [schedule_id])
        if not rows:
            raise NotFound(f"unknown schedule {schedule_id}")
        return rows[0]

    def remove_schedule(self, schedule_id: int) -> None:
        self.get_schedule(schedule_id)
        with self._lock:
            self._con.execute("DELETE FROM schedules WHERE id = ?", [schedule_id])

    def schedule_fired(self, schedule_id: int, run_id: int | None, feedback_mark: int) -> None:
        with self._lock:
            self._con.execute("UPDATE schedules SET last_fired_at = ?, last_run_id = ?, feedback_mark = ?"
                              " WHERE id = ?", [now(), run_id, feedback_mark, schedule_id])

    # ---- training runs and adapters ----------------------------------------------------------
    def start_run(self, algo: str, trigger: str, parent_version: str, settings: dict) -> int:
        row = self._one(
            "INSERT INTO training_runs (algo, trigger, status, started_at, parent_version, settings)"
            " VALUES (?, ?, 'running', ?, ?, ?) RETURNING id",
            [algo, trigger, now(), parent_version, json.dumps(settings)],
        )
        return int(row[0])

    _RUN_FIELDS = {"status", "candidate_version", "snapshot_dir", "n_pairs", "n_eval_pairs",
                   "feedback_ids", "comparison_ids", "metrics", "verdict", "error", "finished_at", "override"}

    def update_run(self, run_id: int, **fields: Any) -> None:
        bad = set(fields) - self._RUN_FIELDS
        if bad:
            raise StoreError(f"unknown run fields {sorted(bad)}")
        cols, vals = [], []
        for k, v in fields.items():
            cols.append(f"{k} = ?")
            vals.append(json.dumps(v) if k in ("feedback_ids", "comparison_ids", "metrics") else v)
        with self._lock:
            self._con.execute(f"UPDATE training_runs SET {', '.join(cols)} WHERE id = ?",
                              vals + [run_id])

    def finish_run(self, run_id: int, status: str, **fields: Any) -> None:
        self.update_run(run_id, status=status, finished_at=now(), **fields)

    def get_run(self, run_id: int) -> dict[str, Any]:
        rows = self._dicts("SELECT * FROM training_runs WHERE id = ?", [run_id])
        if not rows:
            raise NotFound(f"unknown training run {run_id}")
        return _decode_json(rows[0], ("metrics", "settings", "feedback_ids", "comparison_ids"))

    def list_runs(self, limit: int = 50) -> list[dict[str, Any]]:
        rows = self._dicts(
            "SELECT id, algo, trigger, status, started_at, finished_at, parent_version,"
            " candidate_version, n_pairs, n_eval_pairs, verdict, override, error"
            " FROM training_runs ORDER BY id DESC LIMIT ?", [limit])
        return rows

    def record_adapter(self, version: str, parent: str, algo: str, run_id: int | None,
                       path: str, metrics: dict) -> None:
        with self._lock:
            self._con.execute(
                "INSERT INTO adapters VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                [version, parent, algo, run_id, path, json.dumps(metrics), now()])

    def record_activation(self, version: str, previous: str, actor: str, reason: str = "") -> None:
        with self._lock:
            self._con.execute(
                "INSERT INTO adapter_activations (version, previous, actor, reason, activated_at)"
                " VALUES (?, ?, ?, ?, ?)", [version, previous, actor, reason, now()])

    def running_runs(self) -> list[dict[str, Any]]:
        return self._dicts("SELECT id, snapshot_dir FROM training_runs WHERE status = 'running' ORDER BY id")

    def recorded_adapters(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._con.execute("SELECT version FROM adapters").fetchall()}

    def last_activation(self) -> str | None:
        """The version the activation log says serves (None before the first activation)."""
        with self._lock:
            row = self._con.execute("SELECT version FROM adapter_activations ORDER BY id DESC LIMIT 1").fetchone()
        return row[0] if row else None

    # ---- API keys (written by operators, read through chatloop.apikeys) -----------------------
    def add_api_key(self, key_id: str, name: str, secret_sha256: str, chat_per_minute: int | None,
                    feedback_per_minute: int | None, max_pairs: int | None) -> None:
        with self._lock:
            self._con.execute("INSERT INTO api_keys VALUES (?, ?, ?, ?, NULL, ?, ?, ?)",
                              [key_id, name, secret_sha256, now(), chat_per_minute, feedback_per_minute, max_pairs])

    def api_keys(self) -> list[dict[str, Any]]:
        return self._dicts("SELECT * FROM api_keys ORDER BY created_at, id")

    def revoke_api_key(self, key_id: str) -> None:
        with self._lock:
            n = self._con.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL"
                                  " RETURNING id", [now(), key_id]).fetchall()
        if not n:
            raise NotFound(f"no active API key {key_id!r}")

    def user_caps(self) -> dict[str, int]:
        """Per-user caps on training items that differ from the default: API keys' ``max_pairs``."""
        with self._lock:
            rows = self._con.execute("SELECT id, max_pairs FROM api_keys WHERE max_pairs IS NOT NULL").fetchall()
        return {f"key:{key_id}": int(cap) for key_id, cap in rows}

    def served_versions(self) -> set[str]:
        """Every version that has been made active (by the gate, an operator, a rollback)."""
        with self._lock:
            return {r[0] for r in self._con.execute("SELECT DISTINCT version FROM adapter_activations").fetchall()}

    # ---- read-only SQL console ---------------------------------------------------------------
    def query_readonly(self, sql: str, max_rows: int = 1000, timeout_s: float = 10.0,
                       max_bytes: int = 8 << 20) -> SqlResult:
        """Run one read statement (SELECT, WITH ... SELECT, EXPLAIN) with row, byte and time
        limits. Rows stop at ``max_rows`` or once their text passes ``max_bytes`` (truncated)."""
        if not sql or not sql.strip():
            raise SqlRefused("empty query")
        try:
            statements = duckdb.extract_statements(sql)
        except duckdb.Error as exc:
            raise SqlRefused(f"cannot parse query: {exc}") from None
        if len(statements) != 1:
            raise SqlRefused("exactly one statement per query, please")
        kind = statements[0].type.name
        if kind not in READ_ONLY_STATEMENTS:
            raise SqlRefused(f"only read statements are allowed (got {kind})")
        with self._lock:
            cur = self._con.cursor()
        timer = threading.Timer(timeout_s, cur.interrupt)
        timer.start()
        try:
            _refuse_writes_inside(cur, sql)
            # A transaction that is rolled back: even if a read statement had side effects, none stay.
            cur.execute("BEGIN TRANSACTION")
            try:
                res = cur.execute(sql)
                cols = [d[0] for d in res.description] if res.description else []
                rows, size, truncated = [], 0, False
                while len(rows) <= max_rows and not truncated:
                    chunk = res.fetchmany(min(256, max_rows + 1 - len(rows)))
                    if not chunk:
                        break
                    for row in chunk:
                        size += sum(len(v) if isinstance(v, (str, bytes)) else 16 for v in row)
                        if size > max_bytes and rows:
                            truncated = True
                            break
                        rows.append(row)
            finally:
                cur.execute("ROLLBACK")
        except duckdb.InterruptException:
            raise SqlRefused(f"query interrupted after the {timeout_s:g} s time limit") from None
        except duckdb.Error as exc:
            raise SqlRefused(str(exc).splitlines()[0]) from None
        finally:
            timer.cancel()
            cur.close()
        truncated = truncated or len(rows) > max_rows
        return SqlResult(columns=cols, rows=rows[:max_rows], truncated=truncated)


def _refuse_writes_inside(cur: Any, sql: str) -> None:
    """Refuse a read statement whose parse tree holds a write (``WITH x AS (DELETE ... RETURNING
    *) SELECT ...``) or a sequence function: the console must not rely on its rollback alone."""
    inner = _EXPLAIN.sub("", sql, count=1)
    tree = json.loads(cur.execute("SELECT json_serialize_sql(?)", [inner]).fetchone()[0])
    if tree.get("error"):  # e.g. DESCRIBE/SUMMARIZE of a table parse as SELECT; others do not
        raise SqlRefused(f"only read statements are allowed ({tree.get('error_message', 'not a query')})")
    stack: list[Any] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            kind = node.get("type")
            if isinstance(kind, str) and kind.endswith("_NODE") and kind not in _READ_NODES:
                raise SqlRefused(f"only read statements are allowed (the query holds a {kind.removesuffix('_QUERY_NODE').removesuffix('_NODE')})")
            if node.get("class") == "FUNCTION" and str(node.get("function_name", "")).lower() in _STATEFUL_FUNCTIONS:
                raise SqlRefused(f"only read statements are allowed ({node['function_name']} changes a sequence)")
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _decode_json(row: dict[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    for k in keys:
        if isinstance(row.get(k), str):
            row[k] = json.loads(row[k])
    return row
