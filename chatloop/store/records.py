"""The log's row shapes, ids, errors and shared SQL fragments, for every part of the store.

Owns: ``StoreError`` and its kinds (each with its HTTP status, see ``chatloop.errors``),
``GenerationRecord`` (a reply as the engine produced it), the writer's operations (``_Thumb``,
``_Statements``), ids and timestamps, and the feedback events' row shape.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from chatloop.errors import ChatloopError


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

# The conversations whose replies and votes may train (``cv`` is the conversation): not held out
# (imported evaluation rows) and not deleted by their user.
_TRAINABLE = "NOT cv.held_out AND cv.deleted_at IS NULL"

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


def _decode_json(row: dict[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    for k in keys:
        if isinstance(row.get(k), str):
            row[k] = json.loads(row[k])
    return row
