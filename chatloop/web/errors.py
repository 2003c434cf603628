"""Errors as HTTP responses: the one place an exception becomes a status and a JSON body.

Owns: the error shape ``{"error": {"message", "type", "code"}}`` and the handlers that produce
it for ``ChatloopError`` (each class carries its own status, see ``chatloop.errors``), FastAPI's
validation errors (400) and Starlette's HTTP exceptions.

Invariants: a route never catches an error to pick a status; it raises, and this module answers.
"""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatloop.errors import ChatloopError


class ApiError(ChatloopError):
    """An error only the HTTP layer knows (a missing operator token, an empty upload)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.type, self.code = status, type_, code


def error_response(status: int, message: str, type_: str, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "code": code}},
                        status_code=status, headers=headers)


def response_for(exc: Exception) -> JSONResponse:
    """The response for any exception: its own status when it is a ``ChatloopError``, else a 500
    that says no more than that (the traceback goes to the log, not to the client)."""
    if isinstance(exc, ChatloopError):
        return error_response(exc.status, str(exc), exc.type, exc.code, exc.headers())
    return error_response(500, "internal error", "server_error")


def install(app: FastAPI) -> None:
    @app.exception_handler(ChatloopError)
    async def _chatloop_error(_: Request, exc: ChatloopError):
        return response_for(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):
        # e.g. a body that is not UTF-8 or not JSON: the same error shape as everything else
        # ("detail" kept for clients, like Gradio's, that read FastAPI's default shape)
        resp = error_response(exc.status_code, str(exc.detail),
                              "invalid_request_error" if exc.status_code < 500 else "server_error",
                              headers=exc.headers)
        body = json.loads(resp.body)
        body["detail"] = exc.detail
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        parts = []
        for e in exc.errors():
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{loc or 'body'}: {e.get('msg')}")
        return error_response(400, "invalid request: " + "; ".join(parts), "invalid_request_error")
