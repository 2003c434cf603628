"""Reads of the log for training and for people: the votes that count, feedback with its
replies, conversations, version-level A/B votes, logged contexts.

Owns: ``FeedbackReads``. Invariants: the vote that counts is the latest of each user on each
reply (or unordered pair of replies); replies in held-out (imported) conversations and in
conversations their user deleted never train (``_TRAINABLE``).
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from chatloop.store.records import _FEEDBACK_EVENTS, _LATEST_VOTE_PER_USER_AND_PAIR, _TRAINABLE, StoreError


class FeedbackReads:
    def latest_thumbs(self) -> list[dict[str, Any]]:
        """The latest thumb of each (user, message), with the reply and its context; replies in
        held-out (imported) or deleted conversations are left out: they never train."""
        rows = self._dicts(
            f"""
            SELECT f.id AS feedback_id, f.message_id, f.user_id, f.rating, f.reason,
                   m.content AS reply, g.context, g.context_hash, g.adapter_version
            FROM feedback_events f
            JOIN messages m ON m.id = f.message_id
            JOIN generations g ON g.message_id = f.message_id
            JOIN conversations cv ON cv.id = m.conversation_id
            WHERE {_TRAINABLE}
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
        or deleted conversations)."""
        rows = self._dicts(
            f"""
            SELECT c.id AS comparison_id, c.user_id, c.choice, c.message_a, c.message_b,
                   ma.content AS reply_a, mb.content AS reply_b, g.context, g.context_hash
            FROM comparisons c
            JOIN messages ma ON ma.id = c.message_a
            JOIN messages mb ON mb.id = c.message_b
            JOIN generations g ON g.message_id = c.message_a
            JOIN conversations cv ON cv.id = ma.conversation_id
            WHERE {_TRAINABLE}
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

    def version_thumbs(self) -> list[dict[str, Any]]:
        """(version, up, down) of the latest thumb of each user on each reply, by the version that
        wrote the reply; imported conversations are left out (they are not this service's users)."""
        return self._dicts(
            """
            SELECT g.adapter_version AS version, count(*) FILTER (WHERE f.rating = 1) AS up,
                   count(*) FILTER (WHERE f.rating = -1) AS down
            FROM (SELECT message_id, rating FROM feedback_events
                  QUALIFY row_number() OVER (PARTITION BY user_id, message_id ORDER BY created_at DESC, id DESC) = 1) f
            JOIN generations g ON g.message_id = f.message_id
            JOIN messages m ON m.id = f.message_id
            JOIN conversations cv ON cv.id = m.conversation_id
            WHERE cv.source <> 'import'
            GROUP BY 1 ORDER BY 1
            """)

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
        and deleted conversations, oldest first."""
        rows = self._all("SELECT g.context_hash, any_value(g.context) FROM generations g"
                         " JOIN messages m ON m.id = g.message_id JOIN conversations cv ON cv.id = m.conversation_id"
                         f" WHERE {_TRAINABLE} GROUP BY g.context_hash ORDER BY min(g.created_at) LIMIT ?", [limit])
        return [(h, json.loads(c)) for h, c in rows]

    def feedback_count(self) -> int:
        """Thumbs plus A/B votes that can train: events on held-out (imported) or deleted conversations
        are not counted, so importing an evaluation split never fires a feedback schedule."""
        return self._one(
            f"""
            SELECT (SELECT count(*) FROM feedback_events f
                    JOIN messages m ON m.id = f.message_id
                    JOIN conversations cv ON cv.id = m.conversation_id WHERE {_TRAINABLE})
                 + (SELECT count(*) FROM comparisons c
                    JOIN messages m ON m.id = c.message_a
                    JOIN conversations cv ON cv.id = m.conversation_id WHERE {_TRAINABLE})
            """)[0]
