"""Who is calling, as FastAPI dependencies: the service, the operator check, the /v1 caller.

Owns: reading the credentials a request brings (``Authorization: Bearer ...`` or
``X-Admin-Token``; an API key ``clk_...``; the signed identity cookie) and deciding who the
caller is. Routes receive the answer; none of them reads a header or a cookie itself.

Invariants:
- With no operator token configured no request is an operator (admin routes answer 403).
- A wrong operator token counts toward its client address's back-off (429 while it lasts), and
  an address that must wait is no operator.
- A /v1 caller is its API key's user when it brings a key (a wrong or revoked key is 401);
  else, unless the service requires keys, ``api:<user>`` when the body names one, or the
  cookie's ``ui:<id>`` (a new id when it has none: never a shared user). Each unkeyed identity
  new to a client address counts toward that address's hourly ceiling.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from chatloop.apikeys import ApiKey, looks_like_key
from chatloop.identity import request_uid
from chatloop.ratelimit import RateLimited
from chatloop.service import Service
from chatloop.web.errors import ApiError


def service_of(request: Request) -> Service:
    return request.app.state.service


def given_token(request: Request) -> str:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("x-admin-token", "")


def client_address(request: Request) -> str:
    return request.client.host if request.client else "?"


def is_operator(request: Request) -> bool:
    """Whether the request carries the operator token (never raises)."""
    given = given_token(request)
    if not given or looks_like_key(given):
        return False
    try:
        return request.app.state.operators.matches(given, client_address(request))
    except RateLimited:
        return False


def require_operator(request: Request) -> None:
    """The admin routes' dependency: 403 when admin is disabled or the token is wrong, 401 when
    none is given, 429 while the address must wait after wrong ones."""
    operators = request.app.state.operators
    if not operators.enabled:
        raise ApiError(403, "admin routes are disabled: no operator token is configured "
                            "(set CHATLOOP_ADMIN_TOKEN)", "permission_error")
    given = given_token(request)
    if not given:
        raise ApiError(401, "operator token required", "authentication_error")
    if not operators.matches(given, client_address(request)):  # RateLimited: 429
        raise ApiError(403, "wrong operator token", "permission_error")


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


def caller(request: Request, user: str | None) -> Caller:
    """The caller of a /v1 route (see the module's invariants); ``user`` is then only a label
    of a key holder's, not recorded."""
    service = service_of(request)
    token = given_token(request)
    if looks_like_key(token):
        key = service.authenticate_key(token)
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
        known = service.cookie_user(request.cookies)
        bucket = f"cookie:{known}" if known else f"addr:{client_address(request)}"
    service.admit_identity(client_address(request), user_id)  # RateLimited past the ceiling
    return Caller(user_id, bucket)


def admitted(request: Request, user: str | None, action: str) -> Caller:
    """The caller, once its ``action`` ('chat' or 'feedback') allowance admits this request."""
    who = caller(request, user)
    service_of(request).check_rate(action, who.rate_key, who.per_minute(action))
    return who
