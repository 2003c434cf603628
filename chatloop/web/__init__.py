"""The HTTP app: the OpenAI-compatible chat API, feedback, and the operator's admin routes.

Owns: assembling the app from one router per area (``chat``, ``conversations``, ``feedback``,
``admin_runs``, ``admin_adapters``, ``admin_data``), its middleware (identity cookie, request limits) and its
error handlers (``errors``). Routes read who is calling from ``deps`` and call ``Service`` only.

Invariants:
- Errors are JSON ``{"error": {"message", "type", "code"}}``; each error class carries its own
  status (``chatloop.errors``), and nothing is written for a refused request.
- ``/admin/*`` needs the operator token (``Authorization: Bearer ...`` or ``X-Admin-Token``);
  with no token configured every admin route answers 403.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request

from chatloop.identity import IdentityMiddleware
from chatloop.operators import OperatorGate
from chatloop.requestguard import BodyLimitMiddleware
from chatloop.service import Service
from chatloop.web import admin_adapters, admin_data, admin_runs, chat, conversations, errors, feedback
from chatloop.web.deps import is_operator


def create_app(service: Service, admin_token: str, schedules: Any = None) -> FastAPI:
    """The HTTP app. ``schedules`` is the process's ``jobs.scheduler.RetrainScheduler`` (the
    composition root passes it in; without one the /admin/jobs routes answer 503)."""
    app = FastAPI(title="chatloop", version="0.1.0")
    app.state.service = service
    app.state.operators = OperatorGate(admin_token, service.signin_backoff)
    app.state.schedules = schedules
    app.add_middleware(IdentityMiddleware, signer=service.signer)
    lim = service.settings.limits
    app.add_middleware(BodyLimitMiddleware, max_bytes=lim.max_body_bytes, read_timeout_s=lim.request_read_timeout_s,
                       large_prefixes={"/admin/import/": lim.max_import_bytes},
                       trusted=lambda scope: is_operator(Request(scope)))
    errors.install(app)
    for area in (chat, conversations, feedback, admin_runs, admin_adapters, admin_data):
        app.include_router(area.router)
    return app
