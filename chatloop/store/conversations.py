"""A user's own conversations: the list they see, the replies of one, and soft deletion.

Owns: ``ConversationLog``. Invariants: a user sees and deletes only their own conversations
(another user's is Forbidden, a deleted one NotFound for them); deleting marks the conversation
(``deleted_at``) and removes nothing: its rows stay in the log for operators, and the reads that
feed training leave it out from then on (``records._TRAINABLE``).
"""

from __future__ import annotations

import json
import re
from typing import Any, Sequence

from chatloop.store.records import Forbidden, NotFound, _Statements, now

TITLE_CHARS = 60
_MARKUP = re.compile(r"```[\w+-]*|[*_`#>]+")  # markdown's fences, emphasis, code, headings, quotes


def title_of(first_message: str | None) -> str:
    """A conversation's title: its first user message as one line of plain text, shortened."""
    title = " ".join(_MARKUP.sub(" ", first_message or "").split())
    return title if len(title) <= TITLE_CHARS else title[:TITLE_CHARS - 1] + "…"


class ConversationLog:
    def conversation_owner(self, conversation_id: str) -> str:
        """The user a conversation belongs to; NotFound when it does not exist or was deleted."""
        row = self._one("SELECT user_id, deleted_at FROM conversations WHERE id = ?", [conversation_id])
        if row is None:
            raise NotFound(f"unknown conversation {conversation_id!r}")
        if row[1] is not None:
            raise NotFound(f"conversation {conversation_id!r} was deleted")
        return row[0]

    def user_conversations(self, user_id: str, exclude_sources: Sequence[str] = (),
                           limit: int = 100) -> list[dict[str, Any]]:
        """``user_id``'s conversations that have a reply and are not deleted, the most recently
        active first: id, title (``title_of`` the first user message), created_at, updated_at and
        replies (how many assistant replies, retries and branches included)."""
        skip = list(exclude_sources) or [""]
        rows = self._dicts(
            f"""
            SELECT c.id, c.created_at, max(m.created_at) AS updated_at,
                   arg_min(m.content, m.created_at) FILTER (WHERE m.role = 'user') AS title,
                   count(*) FILTER (WHERE m.role = 'assistant') AS replies
            FROM conversations c JOIN messages m ON m.conversation_id = c.id
            WHERE c.user_id = ? AND c.deleted_at IS NULL AND c.source NOT IN ({", ".join("?" * len(skip))})
            GROUP BY c.id, c.created_at
            HAVING count(*) FILTER (WHERE m.role = 'assistant') > 0
            ORDER BY updated_at DESC, c.id DESC LIMIT ?
            """, [user_id, *skip, max(1, min(int(limit), 1000))])
        for r in rows:
            r["title"] = title_of(r["title"])
        return rows

    def conversation_replies(self, conversation_id: str, user_id: str) -> list[dict[str, Any]]:
        """Every reply of ``user_id``'s conversation, oldest first, with its context, the version
        that wrote it and that user's latest thumb on it (rating, reason, comment or None).
        Forbidden for another user's conversation, NotFound for an unknown or deleted one."""
        if self.conversation_owner(conversation_id) != user_id:
            raise Forbidden("that conversation belongs to another user")
        rows = self._dicts(
            """
            SELECT m.id AS message_id, m.content, m.created_at, g.context, g.context_hash,
                   g.adapter_version, f.rating, f.reason, f.comment
            FROM messages m JOIN generations g ON g.message_id = m.id
            LEFT JOIN (SELECT message_id, rating, reason, comment FROM feedback_events WHERE user_id = ?
                       QUALIFY row_number() OVER (PARTITION BY message_id ORDER BY created_at DESC, id DESC) = 1
                      ) f ON f.message_id = m.id
            WHERE m.conversation_id = ? AND m.role = 'assistant'
            ORDER BY m.created_at, m.id
            """, [user_id, conversation_id])
        for r in rows:
            r["context"] = json.loads(r["context"])
        return rows

    def delete_conversation(self, conversation_id: str, user_id: str) -> None:
        """Hide ``user_id``'s conversation from them and from training from now on; its rows stay."""
        if self.conversation_owner(conversation_id) != user_id:
            raise Forbidden("that conversation belongs to another user")
        self._writer.submit(_Statements([
            ("UPDATE conversations SET deleted_at = ? WHERE id = ? AND deleted_at IS NULL",
             [now(), conversation_id])]))
