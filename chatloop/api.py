"""HTTP routes: the OpenAI-compatible chat API, feedback, and operator (admin) routes.

Owns: request/response shapes, HTTP status codes and error bodies, operator authentication.

Invariants:
- Errors are JSON ``{"error": {"message", "type", "code"}}`` with a 4xx status for bad input
  (400 invalid, 401/403 auth, 404 unknown id, 409 busy cycle, 422 not enough feedback,
  429/503 busy with Retry-After); nothing is written for a refused request.
- ``/admin/*`` needs the operator token (``Authorization: Bearer ...`` or ``X-Admin-Token``);
  with no token configured every admin route answers 403.
- The chat response ``id`` is the stored assistant message id; ``chatloop_adapter`` names the
  version that produced it, in every stream chunk and in the final response.
- The caller of a /v1 route is its API key's user when it brings one (a wrong or revoked key is
  401), else (unless ``require_api_key``) the ``user`` it names or its cookie's; see ``caller``.
- Wrong operator tokens count toward a back-off per client address (429 while it lasts).
"""

from __future__ import annotations

import hmac
import math
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from chatloop.adapters import AdapterError
from chatloop.apikeys import ApiKey, looks_like_key
from chatloop.disconnect import CompletionResponse, event_stream
from chatloop.engine import Completion, EngineBusy, GenerationFailed, InvalidRequest
from chatloop.identity import IdentityMiddleware, request_uid
from chatloop.loop import CycleBusy, NotEnoughFeedback
from chatloop.ratelimit import RateLimited
from chatloop.requestguard import BodyLimitMiddleware
from chatloop.service import Service
from chatloop.store import Forbidden, NotFound, SqlRefused, StoreError


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.headers = status, message, type_, code, headers


def _error(status: int, message: str, type_: str, code: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "code": code}},
                        status_code=status, headers=headers)


# ---- request bodies ------------------------------------------------------------------------------
class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields we do not use

    messages: list[dict[str, Any]]
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: int | None = None
    user: str | None = None
    chatloop_conversation_id: str | None = None
    chatloop_adapter: str | None = None


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    message_id: str
    rating: Literal[1, -1]
    reason: str | None = None
    comment: str | None = None
    user: str | None = None


class ComparisonRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    message_a: str
    message_b: str
    choice: Literal["a", "b", "tie", "both_bad"]
    user: str | None = None


class RetrainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    algo: str = "dpo"
    wait: bool = False


class ScheduleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["cron", "interval", "feedback"]
    spec: str = Field(max_length=200)  # crontab line | minutes | number of new feedback events
    algo: Literal["dpo", "kto", "ppo"] = "dpo"


class OverrideRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(min_length=1, max_length=500)


class CompareRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str | None = Field(default=None, max_length=32)  # null stops the live comparison


class SqlRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sql: str
    max_rows: int | None = Field(default=None, ge=1)


class KeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=100)
    chat_per_minute: int | None = Field(default=None, ge=0, le=1_000_000)
    feedback_per_minute: int | None = Field(default=None, ge=0, le=1_000_000)
    max_pairs: int | None = Field(default=None, ge=0, le=1_000_000)


@dataclass(frozen=True)
class Caller:
    """Who a /v1 request is: its user id, the rate-limit bucket it draws on, and its API key."""
    user_id: str
    rate_key: str
    key: ApiKey | None = None

    def per_minute(self, action: str) -> int | None:
        if self.key is None:
            return None
        return self.key.chat_per_minute if action == "chat" else self.key.feedback_per_minute


# ---- the app -------------------------------------------------------------------------------------
def create_app(service: Service, admin_token: str, schedules: Any = None) -> FastAPI:
    """The HTTP app. ``schedules`` is the process's ``jobs.scheduler.RetrainScheduler`` (the
    composition root passes it in; without one the /admin/jobs routes answer 503)."""
    app = FastAPI(title="chatloop", version="0.1.0")
    app.state.service = service
    app.add_middleware(IdentityMiddleware, signer=service.signer)
    lim = service.settings.limits
    app.add_middleware(BodyLimitMiddleware, max_bytes=lim.max_body_bytes, read_timeout_s=lim.request_read_timeout_s,
                       large_prefixes={"/admin/import/": lim.max_import_bytes},
                       trusted=lambda scope: is_operator(Request(scope)))

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError):
        return _error(exc.status, exc.message, exc.type, exc.code, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):
        # e.g. a body that is not UTF-8 or not JSON: the same error shape as everything else
        # ("detail" kept for clients, like Gradio's, that read FastAPI's default shape)
        resp = _error(exc.status_code, str(exc.detail),
                      "invalid_request_error" if exc.status_code < 500 else "server_error", headers=exc.headers)
        body = json.loads(resp.body)
        body["detail"] = exc.detail
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        parts = []
        for e in exc.errors():
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{loc or 'body'}: {e.get('msg')}")
        return _error(400, "invalid request: " + "; ".join(parts), "invalid_request_error")

    def translate(exc: Exception) -> ApiError:
        if isinstance(exc, ApiError):
            return exc
        if isinstance(exc, NotFound):
            return ApiError(404, str(exc), "not_found_error")
        if isinstance(exc, Forbidden):
            return ApiError(403, str(exc), "permission_error")
        if isinstance(exc, (InvalidRequest, StoreError, AdapterError)):
            return ApiError(400, str(exc))
        if isinstance(exc, EngineBusy):
            return ApiError(503, str(exc), "server_busy", headers={"Retry-After": "2"})
        if isinstance(exc, GenerationFailed):
            return ApiError(500, str(exc), "server_error", "generation_failed")
        if isinstance(exc, RateLimited):
            return ApiError(429, str(exc), "rate_limit_error",
                            headers={"Retry-After": str(max(1, math.ceil(exc.retry_after)))})
        raise exc

    # ---- chat ----------------------------------------------------------------------------------
    v1 = APIRouter(prefix="/v1")

    @v1.get("/models")
    def models():
        return {"object": "list", "data": [{"id": service.model_name, "object": "model",
                                            "owned_by": "chatloop",
                                            "chatloop_adapter": service.engine.active_version}]}

    def caller(request: Request, user: str | None) -> Caller:
        """The caller of a /v1 route: the API key's user when it brings a key (``user`` is then
        only a label of the key holder's and not recorded); else, unless the service requires
        keys, ``api:<user>`` when the body names one or the cookie's ``ui:<id>`` (a new id when
        it has none: never a shared user), each one new to this client address counting toward
        its hourly ceiling."""
        token = given_token(request)
        if looks_like_key(token):
            key = service.keys.authenticate(token)
            if key is None:
                raise ApiError(401, "invalid or revoked API key", "authentication_error")
            return Caller(key.user_id, f"key:{key.id}", key)
        if service.settings.require_api_key and not is_operator(request):
            raise ApiError(401, "this service requires an API key: send Authorization: Bearer clk_... "
                                "(an operator issues one with `chatloop keys create`)", "authentication_error")
        if user:
            if len(user) > 128 or not user.isprintable():
                raise ApiError(400, "user must be a printable string of at most 128 characters")
            user_id, bucket = "api:" + user, f"user:{user}"
        else:
            uid = request_uid(request)
            if uid is None:  # only without IdentityMiddleware, which every app here has
                raise ApiError(400, "name a user or keep the chatloop_uid cookie")
            user_id = f"ui:{uid}"
            known = service.signer.uid_from_cookies(request.cookies)
            bucket = f"cookie:{known}" if known else f"addr:{client_address(request)}"
        service.new_identities.admit(client_address(request), user_id)  # RateLimited past the ceiling
        return Caller(user_id, bucket)

    @v1.post("/chat/completions")
    def chat_completions(body: ChatCompletionRequest, request: Request):
        try:
            who = caller(request, body.user)
            service.check_rate("chat", who.rate_key, who.per_minute("chat"))
            if body.n not in (None, 1):
                raise InvalidRequest("n must be 1")
            max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
            params = service.params(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                                    max_tokens=max_tokens, repetition_penalty=body.repetition_penalty,
                                    stop=body.stop, seed=body.seed)
            adapter = body.chatloop_adapter
            operator = adapter is not None and not service.is_public_version(adapter) and is_operator(request)
            turn = service.chat(body.messages, params, user_id=who.user_id,
                                conversation_id=body.chatloop_conversation_id, source="api",
                                adapter=adapter, operator=operator)
        except Exception as exc:
            raise translate(exc) from None
        created = int(time.time())
        model = service.model_name
        if not body.stream:
            def render(c: Completion) -> Response:
                return JSONResponse({
                    "id": turn.message_id, "object": "chat.completion", "created": created, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                                 "finish_reason": _finish(c.finish_reason)}],
                    "usage": {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                              "total_tokens": c.prompt_tokens + c.completion_tokens},
                    "chatloop_adapter": c.adapter_version,
                    "chatloop_conversation_id": turn.conversation_id,
                })

            def on_error(exc: Exception) -> Response:
                try:
                    err = translate(exc)
                except Exception:  # noqa: BLE001 - unexpected: a 500 in the usual error shape
                    err = ApiError(500, "generation failed", "server_error")
                return _error(err.status, err.message, err.type, err.code, err.headers)

            return CompletionResponse(turn, render, on_error)  # generated as it is sent

        def chunk(delta: dict, finish: str | None = None, **extra: Any) -> str:
            obj = {"id": turn.message_id, "object": "chat.completion.chunk", "created": created,
                   "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                   "chatloop_adapter": turn.adapter_version,
                   "chatloop_conversation_id": turn.conversation_id, **extra}
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
            c = turn.completion
            if first:
                yield chunk({"role": "assistant", "content": ""})
            usage = {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                     "total_tokens": c.prompt_tokens + c.completion_tokens}
            yield chunk({}, _finish(c.finish_reason), usage=usage)
            yield "data: [DONE]\n\n"

        return event_stream(turn, events(), {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @v1.post("/feedback")
    def feedback(body: FeedbackRequest, request: Request):
        try:
            who = caller(request, body.user)
            service.check_rate("feedback", who.rate_key, who.per_minute("feedback"))
            fid = service.feedback(body.message_id, body.rating, who.user_id, body.reason, body.comment)
        except Exception as exc:
            raise translate(exc) from None
        return {"id": fid, "message_id": body.message_id, "rating": body.rating}

    @v1.post("/comparisons")
    def comparisons(body: ComparisonRequest, request: Request):
        try:
            who = caller(request, body.user)
            service.check_rate("feedback", who.rate_key, who.per_minute("feedback"))
            cid = service.compare(body.message_a, body.message_b, body.choice, who.user_id)
        except Exception as exc:
            raise translate(exc) from None
        return {"id": cid, "choice": body.choice}

    app.include_router(v1)

    @app.get("/healthz")
    def healthz():
        return {"ok": True, "active_adapter": service.engine.active_version}

    # ---- operators -----------------------------------------------------------------------------
    def given_token(request: Request) -> str:
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip()
        return request.headers.get("x-admin-token", "")

    def client_address(request: Request) -> str:
        return request.client.host if request.client else "?"

    def token_matches(request: Request, given: str) -> bool:
        """Compare a token, with a back-off per client address after repeated wrong ones."""
        address = client_address(request)
        service.signin_backoff.check(address)  # RateLimited while the address must wait
        if hmac.compare_digest(given.encode(), admin_token.encode()):
            service.signin_backoff.succeeded(address)
            return True
        service.signin_backoff.failed(address)
        return False

    def is_operator(request: Request) -> bool:
        """Whether the request carries the operator token (never raises; a wrong one counts
        toward the address's back-off, and an address that must wait is no operator)."""
        given = given_token(request)
        if not (admin_token and given):
            return False
        try:
            return token_matches(request, given)
        except RateLimited:
            return False

    def require_operator(request: Request) -> None:
        if not admin_token:
            raise ApiError(403, "admin routes are disabled: no operator token is configured "
                                "(set CHATLOOP_ADMIN_TOKEN)", "permission_error")
        given = given_token(request)
        if not given:
            raise ApiError(401, "operator token required", "authentication_error")
        try:
            if not token_matches(request, given):
                raise ApiError(403, "wrong operator token", "permission_error")
        except RateLimited as exc:
            raise translate(exc) from None

    admin = APIRouter(prefix="/admin", dependencies=[Depends(require_operator)])

    @admin.get("/status")
    def status():
        return service.status()

    @admin.post("/retrain", status_code=202)
    def retrain(body: RetrainRequest | None = None):
        body = body or RetrainRequest()
        try:
            if body.wait:
                return service.retrainer.run_cycle(body.algo, trigger="api")
            run_id = service.retrainer.start_cycle(body.algo, trigger="api")
        except CycleBusy as exc:
            raise ApiError(409, str(exc), "conflict_error") from None
        except NotEnoughFeedback as exc:
            raise ApiError(422, str(exc), "not_enough_feedback") from None
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        except Exception as exc:  # the cycle failed after it started: its run is recorded as failed
            raise ApiError(500, f"the retraining cycle failed: {type(exc).__name__}: {exc}",
                           "server_error", "training_failed") from None
        return {"run_id": run_id, "status": "running"}

    @admin.post("/cancel")
    def cancel():
        return {"cancelled": service.retrainer.cancel()}

    @admin.get("/runs")
    def runs(limit: int = 50):
        return {"runs": service.store.list_runs(min(max(limit, 1), 500))}

    @admin.get("/runs/{run_id}")
    def run(run_id: int):
        try:
            r = service.store.get_run(run_id)
        except NotFound as exc:
            raise ApiError(404, str(exc), "not_found_error") from None
        cur = service.retrainer.current
        r["progress"] = cur.as_dict() if cur and cur.run_id == run_id else None
        return r

    @admin.post("/runs/{run_id}/override")
    def override(run_id: int, body: OverrideRequest):
        try:
            previous = service.override(run_id, body.reason)
        except NotFound as exc:
            raise ApiError(404, str(exc), "not_found_error") from None
        except (InvalidRequest, AdapterError) as exc:
            raise ApiError(409 if "only a rejected" in str(exc) else 400, str(exc)) from None
        run = service.store.get_run(run_id)
        return {"active": run["candidate_version"], "previous": previous, "run": run["id"],
                "status": run["status"]}

    @admin.get("/ratings")
    def ratings():
        return {"ratings": service.ratings(), "live_comparison": service.live_comparison()}

    @admin.post("/compare")
    def live_compare(body: CompareRequest):
        try:
            service.set_live_comparison(body.version)
        except AdapterError as exc:
            raise ApiError(404 if "unknown" in str(exc) else 400, str(exc)) from None
        except InvalidRequest as exc:
            raise ApiError(400, str(exc)) from None
        return {"live_comparison": service.live_comparison()}

    @admin.get("/adapters")
    def adapters():
        return {"active": service.engine.active_version, "adapters": service.registry.list()}

    @admin.post("/adapters/{version}/activate")
    def activate(version: str):
        try:
            previous = service.activate(version, actor="operator", reason="activated by an operator")
        except AdapterError as exc:
            raise ApiError(404 if "unknown" in str(exc) else 400, str(exc)) from None
        return {"active": version, "previous": previous}

    @admin.post("/rollback")
    def rollback():
        try:
            previous, active = service.rollback()
        except AdapterError as exc:
            raise ApiError(400, str(exc)) from None
        return {"active": active, "previous": previous}

    @admin.get("/keys")
    def list_keys():
        return {"keys": service.keys.list()}

    @admin.post("/keys", status_code=201)
    def create_key(body: KeyRequest):
        try:
            listing, token = service.keys.create(body.name, body.chat_per_minute, body.feedback_per_minute,
                                                 body.max_pairs)
        except StoreError as exc:
            raise ApiError(400, str(exc)) from None
        return {**listing, "key": token}  # the only time the key is shown

    @admin.delete("/keys/{key_id}")
    def revoke_key(key_id: str):
        try:
            service.keys.revoke(key_id)
        except NotFound as exc:
            raise ApiError(404, str(exc), "not_found_error") from None
        return {"revoked": key_id}

    @admin.post("/sql")
    def sql(body: SqlRequest):
        lim = service.settings.limits
        try:
            res = service.store.query_readonly(body.sql, min(body.max_rows or lim.sql_max_rows, lim.sql_max_rows),
                                               lim.sql_timeout_s, lim.sql_max_bytes)
        except SqlRefused as exc:
            raise ApiError(400, str(exc), "sql_refused") from None
        return {"columns": res.columns, "rows": [list(map(_jsonable, r)) for r in res.rows],
                "truncated": res.truncated}

    @admin.get("/export")
    def export(what: Literal["pairs", "feedback", "conversations"] = "feedback",
               format: Literal["jsonl", "parquet"] = "jsonl"):  # noqa: A002 - the query parameter's name
        from chatloop.export import encode, export_rows

        body = encode(export_rows(service.store, what, service.settings.training), format)
        media = "application/x-ndjson" if format == "jsonl" else "application/vnd.apache.parquet"
        return Response(body, media_type=media,
                        headers={"Content-Disposition": f'attachment; filename="chatloop-{what}.{format}"'})

    @admin.post("/import/{kind}")
    async def import_data(kind: Literal["oasst", "hh"], request: Request, name: str = "upload",
                          limit: int | None = None):
        """Replay a public data set (the file's bytes are the body) into the log: OpenAssistant
        trees (``*.jsonl``) or HH-RLHF pairs (``*.jsonl`` or ``*.jsonl.gz``)."""
        import asyncio
        import tempfile

        from chatloop import importers

        data = await request.body()
        if not data:
            raise ApiError(400, "the request body must hold the file to import")
        suffix = ".jsonl.gz" if data[:2] == b"\x1f\x8b" else ".jsonl"
        safe = "".join(ch for ch in Path(name).name if ch.isalnum() or ch in "._-")[:100] or "upload"
        with tempfile.TemporaryDirectory(prefix="chatloop-import-") as tmp:
            path = Path(tmp) / (safe.removesuffix(".gz").removesuffix(".jsonl") + suffix)
            path.write_bytes(data)
            try:  # in a worker thread: the import's writes must not stall the event loop
                report = await asyncio.to_thread(
                    (lambda: importers.import_oasst(service.store, path)) if kind == "oasst"
                    else (lambda: importers.import_hh(service.store, path, limit)))
            except (ValueError, KeyError, TypeError, OSError) as exc:  # json, gzip and shape errors
                raise ApiError(400, f"cannot import this file as {kind}: {type(exc).__name__}: {exc}") from None
        return report.as_dict()

    def scheduler() -> Any:
        if schedules is None:
            raise ApiError(503, "this process runs no scheduler", "unavailable")
        return schedules

    @admin.get("/jobs")
    def jobs():
        return {"jobs": scheduler().list()}

    @admin.post("/jobs", status_code=201)
    def add_job(body: ScheduleRequest):
        try:
            return scheduler().add(body.kind, body.spec, body.algo, created_by="api")
        except ValueError as exc:  # ScheduleError: a bad crontab line or number
            raise ApiError(400, str(exc)) from None

    @admin.delete("/jobs/{schedule_id}")
    def remove_job(schedule_id: int):
        try:
            scheduler().remove(schedule_id)
        except NotFound as exc:
            raise ApiError(404, str(exc), "not_found_error") from None
        return {"removed": schedule_id}

    @admin.post("/jobs/{schedule_id}/run", status_code=202)
    def run_job(schedule_id: int):
        try:
            run_id = scheduler().run_now(schedule_id)
        except NotFound as exc:
            raise ApiError(404, str(exc), "not_found_error") from None
        except CycleBusy as exc:
            raise ApiError(409, str(exc), "conflict_error") from None
        except NotEnoughFeedback as exc:
            raise ApiError(422, str(exc), "not_enough_feedback") from None
        return {"run_id": run_id, "status": "running"}

    app.include_router(admin)
    return app


def _finish(reason: str) -> str:
    return {"stop": "stop", "length": "length", "cancelled": "stop"}.get(reason, "stop")


def _jsonable(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)
