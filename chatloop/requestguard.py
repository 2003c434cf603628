"""Limits on how a request arrives: its body's size and how long its head and body may take.

Owns: ``BodyLimitMiddleware`` (pure ASGI: reads every HTTP request body up front, answers 413
past the size cap and 408 past the read deadline, then hands the app the whole body) and
``GuardedH11Protocol`` (uvicorn's h11 protocol with a deadline for a request's head to arrive).

Invariants:
- No request body over ``max_bytes`` is ever held in memory: a too-large ``Content-Length`` is
  refused before a byte is read, and a chunked body is refused as soon as it passes the cap.
  Paths under a ``large_prefixes`` entry (the operator's data import) have their own cap, for a
  request that ``trusted`` accepts (it carries the operator token) and only for it.
- A client that sends its head or body slowly cannot hold a connection or a worker: the head must
  be complete ``head_timeout_s`` after the connection opens (or after the previous response), the
  body ``read_timeout_s`` after the head. Streamed responses are not limited (only the request).
- After the body, the app's ``receive`` is the server's own, so a client disconnect still
  reaches the app (see chatloop.web.disconnect).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Callable

from uvicorn.protocols.http.h11_impl import H11Protocol


async def _refuse(send: Any, status: int, message: str) -> None:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                 "code": "request_too_large" if status == 413 else "request_timeout"},
                       "detail": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    def __init__(self, app: Any, max_bytes: int, read_timeout_s: float,
                 large_prefixes: dict[str, int] | None = None,
                 trusted: Callable[[dict[str, Any]], bool] = lambda scope: False):
        self.app, self.max_bytes, self.read_timeout_s = app, max_bytes, read_timeout_s
        self.large_prefixes, self.trusted = large_prefixes or {}, trusted

    def _limit(self, scope: dict[str, Any]) -> int:
        path = scope.get("path", "")
        for prefix, limit in self.large_prefixes.items():
            if path.startswith(prefix) and self.trusted(scope):
                return limit
        return self.max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope)
        too_large = f"the request body is larger than the {limit} bytes this route takes"
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None:
            try:
                if int(declared) > limit:
                    await _refuse(send, 413, too_large)
                    return
            except ValueError:
                pass  # the server refuses a malformed Content-Length itself
        chunks: list[bytes] = []
        size = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.read_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except (asyncio.TimeoutError, TimeoutError):
                await _refuse(send, 408, f"the request body did not arrive within {self.read_timeout_s:g} s")
                return
            if message["type"] == "http.disconnect":
                return  # the client left before its request was whole: nothing to answer
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                await _refuse(send, 413, too_large)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        whole = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        delivered = False

        async def replay() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return whole
            return await receive()

        await self.app(scope, replay, send)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request head does not arrive in time.

    uvicorn bounds the idle time between requests (``timeout_keep_alive``) but not a head that is
    sent in part and then left hanging: each such connection would be held forever."""

    head_timeout_s: float = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_deadline()

    def _arm_head_deadline(self) -> None:
        cycle = self.cycle  # the request that was current when the deadline was set
        handle = getattr(self, "_head_deadline", None)
        if handle is not None:
            handle.cancel()
        self._head_deadline = self.loop.call_later(self.head_timeout_s, self._head_late, cycle)

    def _head_late(self, cycle: Any) -> None:
        if self.cycle is cycle and not self.transport.is_closing():  # no new request began
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        handle = getattr(self, "_head_deadline", None)
        if handle is not None:
            handle.cancel()
        super().connection_lost(exc)


def guarded_protocol(head_timeout_s: float) -> type[GuardedH11Protocol]:
    """The protocol class for ``uvicorn.run(http=...)`` with this head deadline."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"head_timeout_s": head_timeout_s})
