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
  row per (user, message) counts. Nothing here deletes or rewrites user data: a conversation
  its user deletes is only marked (``deleted_at``), and from then on never trains.
- The database is opened with external access disabled and its configuration locked, so SQL
  (the console's included) can read no file, fetch no URL, load no extension; exports are written
  by Python from query results.
- Every assistant message has a ``generations`` row naming the adapter version ('base' when none).

Layout: ``schema`` (migrations), ``records`` (row shapes, ids, errors), ``core`` (connection,
lock, writer side), ``writes``, ``conversations`` (a user's own: list, replies, deletion),
``reads``, ``runs`` (schedules, runs, adapters, keys) and ``console`` (read-only SQL); ``Store`` is all of them behind one object.
"""

from __future__ import annotations

from chatloop.store.console import SqlConsole, SqlResult
from chatloop.store.conversations import ConversationLog
from chatloop.store.core import StoreCore
from chatloop.store.reads import FeedbackReads
from chatloop.store.records import (Forbidden, GenerationRecord, NotFound, SqlRefused, StoreError, _Statements,
                                    _Thumb, context_hash, new_id, now)
from chatloop.store.runs import RunRecords
from chatloop.store.schema import MIGRATIONS
from chatloop.store.writes import LogWrites

__all__ = ["MIGRATIONS", "Forbidden", "GenerationRecord", "NotFound", "SqlRefused", "SqlResult", "Store",
           "StoreError", "_Statements", "_Thumb", "context_hash", "new_id", "now"]


class Store(LogWrites, ConversationLog, FeedbackReads, RunRecords, SqlConsole, StoreCore):
    """The single owner of the DuckDB file in this process."""
