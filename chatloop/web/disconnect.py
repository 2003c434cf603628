"""Responses that notice when the client hangs up, so its generation stops and is still stored.

Owns: the two ways a chat reply leaves the server (a finished JSON body, an SSE stream) when
the client may go away first, and what happens then: ``ChatTurn.abandon()`` (cancel at the next
decode step, store what was generated).

Invariants:
- A real disconnect (the socket closed) is seen through the ASGI ``http.disconnect`` message,
  whichever way the server reports it: while a non-streaming reply is still being generated, or
  between two chunks of a stream (a failed send, or a cancelled response task).
- The reply is generated while the response is being sent, not in the route, so a route never
  holds a worker thread for a client that is gone.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Callable, Iterator

import anyio
from starlette.concurrency import iterate_in_threadpool
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from chatloop.engine import Completion
from chatloop.service import ChatTurn


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class CompletionResponse(Response):
    """A non-streaming chat reply: generate, then send ``render(completion)``; if the client
    hangs up first, abandon the turn and send nothing. ``on_error(exc)`` turns a failed
    generation into the response to send."""

    def __init__(self, turn: ChatTurn, render: Callable[[Completion], Response],
                 on_error: Callable[[Exception], Response]):
        super().__init__()
        self.turn, self.render, self.on_error = turn, render, on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        outcome: dict[str, Any] = {}
        async with anyio.create_task_group() as group:

            async def generate() -> None:
                try:
                    outcome["completion"] = await anyio.to_thread.run_sync(self.turn.result,
                                                                           abandon_on_cancel=True)
                except Exception as exc:  # noqa: BLE001 - answered by on_error below
                    outcome["error"] = exc
                group.cancel_scope.cancel()

            async def watch() -> None:
                await _until_disconnect(receive)
                outcome["gone"] = True
                group.cancel_scope.cancel()

            group.start_soon(generate)
            group.start_soon(watch)
        if outcome.get("gone") and "completion" not in outcome and "error" not in outcome:
            self.turn.abandon()
            return
        if "error" in outcome:
            response = self.on_error(outcome["error"])
        else:
            response = self.render(outcome["completion"])
        await response(scope, receive, send)


def event_stream(turn: ChatTurn, events: Iterator[str], headers: dict[str, str]) -> StreamingResponse:
    """An SSE response of ``events`` (a generator that iterates ``turn``). However the stream
    ends early (the client hung up), the turn is abandoned: cancelled and stored."""

    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in iterate_in_threadpool(events):
                yield chunk
        finally:
            if turn.completion is None:
                turn.abandon()

    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)
