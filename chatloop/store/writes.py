"""Writes of the log: users, conversations, replies with their generation records, thumbs and
A/B votes, all through the group-commit writer (acknowledged only once committed).

Owns: ``LogWrites``. Invariants: feedback is append-only (a changed vote is a new row); a vote
with ``shown_only`` is refused (Forbidden) unless the reply was written for that user.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from chatloop.store.records import (Forbidden, GenerationRecord, NotFound, StoreError, _Statements, _Thumb,
                                    context_hash, new_id, now)


class LogWrites:
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
