"""Anonymous browser identity: every browser gets a random user id in a cookie.

Owns: the ``chatloop_uid`` cookie (issuing it, and reading a valid one back) and the ASGI
middleware that sets it on responses to requests that came without one.

Invariants:
- The id is 128 random bits (url-safe base64), HttpOnly and SameSite=Lax, valid for a year; a
  malformed cookie is ignored and replaced, never trusted.
- The middleware is pure ASGI (it only adds a header to ``http.response.start``), so streamed
  replies and client-disconnect detection work exactly as without it.
- The UI's user is ``ui:<id>``; an API call without ``user`` but with the cookie is that user too.
- A request without a valid cookie is a new user, never a shared one: the middleware mints its
  id before the app runs (``minted_uid`` reads it), and the response sets it as the cookie, so a
  client that keeps cookies stays that user and one that does not is a stranger every time.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from http.cookies import SimpleCookie
from typing import Any

COOKIE = "chatloop_uid"
_VALID = re.compile(r"[A-Za-z0-9_-]{20,64}")
MAX_AGE = 365 * 24 * 3600
_STATE_KEY = "chatloop_minted_uid"


def new_uid() -> str:
    return secrets.token_urlsafe(16)


def uid_from_cookies(cookies: Mapping[str, str] | None) -> str | None:
    """The browser's id if its cookie is well-formed, else None."""
    value = (cookies or {}).get(COOKIE)
    return value if value and _VALID.fullmatch(value) else None


def minted_uid(scope: Mapping[str, Any]) -> str | None:
    """The id the middleware gave a request that came without a valid cookie (else None)."""
    return (scope.get("state") or {}).get(_STATE_KEY)


def request_uid(request: Any) -> str | None:
    """The request's anonymous id: its valid cookie, else the one minted for it."""
    return uid_from_cookies(getattr(request, "cookies", None)) or minted_uid(getattr(request, "scope", {}))


def _cookie_header(scope: dict[str, Any]) -> dict[str, str]:
    raw = b"; ".join(v for k, v in scope.get("headers", []) if k == b"cookie").decode("latin-1")
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(raw)
    except Exception:  # noqa: BLE001 - a garbled Cookie header is as good as none
        return {}
    return {k: m.value for k, m in jar.items()}


class IdentityMiddleware:
    """Give every browser that has no valid ``chatloop_uid`` cookie a new one."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or uid_from_cookies(_cookie_header(scope)):
            await self.app(scope, receive, send)
            return
        uid = new_uid()
        scope.setdefault("state", {})[_STATE_KEY] = uid  # what request_uid() returns for this request
        cookie = (f"{COOKIE}={uid}; Max-Age={MAX_AGE}; Path=/; HttpOnly; SameSite=Lax").encode()

        async def send_with_cookie(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie)]}
            await send(message)

        await self.app(scope, receive, send_with_cookie)
