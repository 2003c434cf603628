"""What a user sees of one conversation: its current branch, with the alternatives at each reply.

Owns: turning a conversation's logged replies (every reply carries the full context it answered,
``generations.context``) into the turns a chat client shows, and choosing among alternatives.
Nothing is stored for branches: a retry is another reply to the same context (same
``context_hash``), an edited message starts a new context, and the old branch stays in the log.

Invariants:
- The current branch is the context of the conversation's latest reply, followed by that reply.
- An assistant turn lists every reply to its context in this conversation, oldest first
  (``alternatives``), and mirrors the one shown (``pick``) in its own fields (``message_id``,
  ``content``, ``adapter``, ``rating``, ``reason``, ``comment``), so a thumb lands on the reply
  the user saw.
- A turn whose reply cannot be found (an API client that sent a context of its own making) is
  shown as text without a ``message_id``: it cannot be rated.
"""

from __future__ import annotations

from typing import Any

from chatloop.store.records import context_hash

REPLY_FIELDS = ("message_id", "content", "adapter", "rating", "reason", "comment")


def _alternative(reply: dict[str, Any]) -> dict[str, Any]:
    return {"message_id": reply["message_id"], "content": reply["content"], "adapter": reply["adapter_version"],
            "rating": reply.get("rating"), "reason": reply.get("reason"), "comment": reply.get("comment")}


def pick(turn: dict[str, Any], index: int) -> dict[str, Any]:
    """``turn`` showing its ``index``-th alternative (IndexError outside them)."""
    alts = turn["alternatives"]
    if not 0 <= index < len(alts):
        raise IndexError(f"reply {index + 1} of {len(alts)} does not exist")
    return {**turn, **alts[index], "pick": index}


def assistant_turn(alternatives: list[dict[str, Any]], index: int | None = None) -> dict[str, Any]:
    """An assistant turn over ``alternatives`` (reply dicts of ``REPLY_FIELDS``), showing the last
    one unless ``index`` says otherwise."""
    turn = {"role": "assistant", "alternatives": list(alternatives)}
    return pick(turn, len(alternatives) - 1 if index is None else index)


def with_alternative(turn: dict[str, Any], reply: dict[str, Any]) -> dict[str, Any]:
    """``turn`` with one more alternative, shown (a retry)."""
    return assistant_turn(turn.get("alternatives", []) + [reply])


def set_rating(turn: dict[str, Any], rating: int | None, reason: str | None = None,
               comment: str | None = None) -> dict[str, Any]:
    """``turn`` with the shown reply's rating recorded (as the user just gave it)."""
    alts = [dict(a) for a in turn["alternatives"]]
    alts[turn["pick"]].update(rating=rating, reason=reason, comment=comment)
    return pick({**turn, "alternatives": alts}, turn["pick"])


def current_branch(replies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The turns of the current branch from a conversation's replies (oldest first, as
    ``Store.conversation_replies`` gives them)."""
    if not replies:
        return []
    by_context: dict[str, list[dict[str, Any]]] = {}
    for r in replies:
        by_context.setdefault(r["context_hash"], []).append(r)
    latest = replies[-1]
    path = list(latest["context"]) + [{"role": "assistant", "content": latest["content"]}]
    turns: list[dict[str, Any]] = []
    for i, m in enumerate(path):
        if m["role"] != "assistant":
            turns.append({"role": m["role"], "content": m["content"]})
            continue
        siblings = by_context.get(context_hash(path[:i]), [])
        if i == len(path) - 1:
            shown = next(j for j, r in enumerate(siblings) if r["message_id"] == latest["message_id"])
        else:
            same = [j for j, r in enumerate(siblings) if r["content"] == m["content"]]
            if not same:
                turns.append({"role": "assistant", "content": m["content"]})
                continue
            shown = same[-1]
        turns.append(assistant_turn([_alternative(r) for r in siblings], shown))
    return turns
