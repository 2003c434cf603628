"""How the Chat tab shows a conversation: the Chatbot's messages and thumbs, which chatbot row
is which turn, the "reply 2 / 3" navigator, and the sidebar's list of the user's chats.

Owns: pure functions from the tab's turns (``chatloop.conversations``' shape: assistant turns
carry their ``alternatives`` and the one shown) to component values. Invariants: system turns
are kept in the turns (they are part of the context) but never shown, so a chatbot row index is
mapped to its turn with ``turn_index``; every thumb shown is the stored latest rating of the reply
shown in that row.
"""

from __future__ import annotations

from typing import Any

SHOWN_ROLES = ("user", "assistant")
FEEDBACK = {1: "Like", -1: "Dislike"}


def shown(turns: list[dict[str, Any]]) -> list[int]:
    """The indexes of the turns the Chatbot shows, in order."""
    return [i for i, t in enumerate(turns) if t["role"] in SHOWN_ROLES]


def turn_index(turns: list[dict[str, Any]], row: Any) -> int:
    """The turn that chatbot row ``row`` shows (ValueError when there is none)."""
    if isinstance(row, (list, tuple)):
        row = row[0] if row else None
    rows = shown(turns)
    if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < len(rows):
        raise ValueError("that message is not in this conversation")
    return rows[row]


def messages(turns: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [{"role": turns[i]["role"], "content": turns[i]["content"]} for i in shown(turns)]


def feedback_values(turns: list[dict[str, Any]]) -> list[str | None]:
    """One entry per shown assistant message: its thumb as the Chatbot draws it."""
    return [FEEDBACK.get(t.get("rating")) for t in turns if t["role"] == "assistant"]


def alternatives_label(turns: list[dict[str, Any]]) -> str | None:
    """'Reply 2 / 3' when the last reply has alternatives (retries) to go through, else None."""
    last = turns[-1] if turns else None
    if not last or last["role"] != "assistant" or len(last.get("alternatives", [])) < 2:
        return None
    return f"Reply **{last['pick'] + 1} / {len(last['alternatives'])}** to your last message"


def conversation_choices(listing: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The sidebar's (label, conversation id) pairs, newest first."""
    return [(c["title"] or "(untitled)", c["id"]) for c in listing]


def excerpt(text: str, n: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"
