"""What every tab of the UI shares: who the browser's user is, its client address, and tables.

Invariants: a browser's user is its signed ``chatloop_uid`` cookie's (``ui:<id>``); a session
that came without one gets a fresh id, never a shared one.
"""

from __future__ import annotations

import uuid
from typing import Any, Callable

import gradio as gr


def new_user() -> str:
    """A user for a session that came without the identity cookie (cookies blocked)."""
    return "ui:" + uuid.uuid4().hex[:16]


def browser_user(request: gr.Request | None, cookie_user: Callable[[Any], str | None]) -> str:
    """The browser's anonymous user from its signed ``chatloop_uid`` cookie, read by
    ``cookie_user`` (``Service.cookie_user``; see chatloop.identity)."""
    uid = cookie_user(getattr(request, "cookies", None)) if request is not None else None
    return f"ui:{uid}" if uid else new_user()


def address(request: gr.Request | None) -> str:
    return getattr(getattr(request, "client", None), "host", None) or "?"


def table(headers: list[str], rows: list[list[Any]]) -> dict[str, Any]:
    """A Dataframe value; an empty table keeps its headers (one empty row)."""
    return {"headers": headers, "data": rows or [[None] * len(headers)]}
