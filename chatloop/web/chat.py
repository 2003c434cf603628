"""The OpenAI-compatible chat routes: ``/v1/models``, ``/v1/chat/completions``, ``/healthz``.

Owns: the chat completion's JSON and SSE shapes (OpenAI's, plus ``chatloop_adapter`` and
``chatloop_conversation_id``).

Invariants:
- The response ``id`` is the stored assistant message id; ``chatloop_adapter`` names the version
  that produced it, in every stream chunk and in the final response.
- A version that never served anyone (a rejected candidate, a failed run's) is only for an
  operator; for anyone else it is an unknown version.
- The reply is generated while it is sent (``chatloop.web.disconnect``): a client that hangs up
  stops its generation, and what was generated is still stored.
"""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from chatloop.engine import Completion, GenerationFailed, InvalidRequest
from chatloop.service import Service
from chatloop.web.deps import admitted, is_operator, service_of
from chatloop.web.disconnect import CompletionResponse, event_stream
from chatloop.web.errors import response_for
from chatloop.web.protocol import ChatCompletionRequest

router = APIRouter()


def _finish(reason: str) -> str:
    return {"stop": "stop", "length": "length", "cancelled": "stop"}.get(reason, "stop")


def _usage(c: Completion) -> dict[str, int]:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}


@router.get("/v1/models")
def models(service: Service = Depends(service_of)):
    return {"object": "list", "data": [{"id": service.model_name, "object": "model", "owned_by": "chatloop",
                                        "chatloop_adapter": service.active_version}]}


@router.get("/healthz")
def healthz(service: Service = Depends(service_of)):
    return {"ok": True, "active_adapter": service.active_version}


@router.post("/v1/chat/completions")
def chat_completions(body: ChatCompletionRequest, request: Request, service: Service = Depends(service_of)):
    who = admitted(request, body.user, "chat")
    if body.n not in (None, 1):
        raise InvalidRequest("n must be 1")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = service.params(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                            max_tokens=max_tokens, repetition_penalty=body.repetition_penalty,
                            stop=body.stop, seed=body.seed)
    adapter = body.chatloop_adapter
    operator = adapter is not None and not service.is_public_version(adapter) and is_operator(request)
    turn = service.chat(body.messages, params, user_id=who.user_id, conversation_id=body.chatloop_conversation_id,
                        source="api", adapter=adapter, operator=operator)
    created, model = int(time.time()), service.model_name
    if not body.stream:
        def render(c: Completion) -> Response:
            return JSONResponse({
                "id": turn.message_id, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                             "finish_reason": _finish(c.finish_reason)}],
                "usage": _usage(c), "chatloop_adapter": c.adapter_version,
                "chatloop_conversation_id": turn.conversation_id,
            })

        return CompletionResponse(turn, render, response_for)  # generated as it is sent

    def chunk(delta: dict, finish: str | None = None, **extra: Any) -> str:
        obj = {"id": turn.message_id, "object": "chat.completion.chunk", "created": created,
               "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
               "chatloop_adapter": turn.adapter_version, "chatloop_conversation_id": turn.conversation_id, **extra}
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def events():
        first = True
        try:
            for piece in turn:
                yield chunk({"role": "assistant", "content": piece} if first else {"content": piece})
                first = False
        except Exception as exc:  # headers are sent: report in-band, as OpenAI does
            err = {"error": {"message": str(exc), "type": "server_error" if isinstance(
                exc, GenerationFailed) else "invalid_request_error"}}
            yield f"data: {json.dumps(err)}\n\n"
            return
        if first:
            yield chunk({"role": "assistant", "content": ""})
        c = turn.completion
        yield chunk({}, _finish(c.finish_reason), usage=_usage(c))
        yield "data: [DONE]\n\n"

    return event_stream(turn, events(), {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
