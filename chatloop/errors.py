"""The one base of every error a caller causes or can act on, and what it means over HTTP.

Owns: ``ChatloopError`` (an HTTP status, an OpenAI-style error ``type`` and ``code``, and the
headers it needs, carried by the exception class itself) and the generic subclasses for
conflicts and unknown resources.

Invariants:
- Modules raise their own subclasses (``store.NotFound``, ``engine.EngineBusy``,
  ``loop.CycleBusy``, ...); they never build HTTP responses. ``chatloop.web.errors`` turns any
  ``ChatloopError`` into a response in one place, and the UI shows its message: no caller maps
  errors by matching their text.
- An exception that is not a ``ChatloopError`` is a bug, answered as a 500.
"""

from __future__ import annotations


class ChatloopError(Exception):
    """Bad input or a state the caller can act on: shown to them, with ``status`` over HTTP."""
    status = 400
    type = "invalid_request_error"
    code: str | None = None

    def headers(self) -> dict[str, str] | None:
        return None


class Conflict(ChatloopError):
    """The request is well formed but the state it acts on does not allow it now."""
    status = 409
    type = "conflict_error"


class UnknownResource(ChatloopError):
    """The id or name in the request's path names nothing that exists."""
    status = 404
    type = "not_found_error"
