"""Anonymous browser identity and the ceiling on new identities.

Owns: the ``chatloop_uid`` cookie (issuing it signed, and reading a valid one back), the ASGI
middleware that sets it on responses to requests that came without one, the server's signing
secret, and ``NewIdentityLimit``, the per-client-address ceiling on new unkeyed identities.

Invariants:
- The cookie is ``<id>.<mac>``: 128 random bits, and an HMAC-SHA256 of the id under the server's
  secret, so a client cannot choose its id or make new valid ones up; HttpOnly, SameSite=Lax,
  valid for a year. A malformed or forged cookie is ignored and replaced, never trusted.
- The secret is the ``cookie_secret`` setting, else ``cookie_secret`` in the data directory
  (32 random bytes, created mode 0600 on first start), so cookies survive restarts.
- The middleware is pure ASGI (it only adds a header to ``http.response.start``), so streamed
  replies and client-disconnect detection work exactly as without it. It puts the request's id,
  verified or just minted, in the scope's state: ``request_uid`` reads it.
- The UI's user is ``ui:<id>``; an API call without a key or ``user`` but with the cookie is that
  user too. A request without a valid cookie is a new user, never a shared one.
- New identities cost something: a client address may bring at most ``per_hour`` identities that
  it has not used before within an hour (API keys and operators are exempt: they are issued).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Mapping
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

from chatloop.ratelimit import RateLimited

COOKIE = "chatloop_uid"
_VALID_ID = re.compile(r"[A-Za-z0-9_-]{20,64}")
MAX_AGE = 365 * 24 * 3600
_STATE_KEY = "chatloop_uid"


def load_secret(configured: str, data_dir: Path) -> bytes:
    """The cookie-signing secret: the setting, else the data directory's (made on first use)."""
    if configured:
        return configured.encode()
    path = data_dir / "cookie_secret"
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    secret = secrets.token_bytes(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first
        return bytes.fromhex(path.read_text().strip())
    with os.fdopen(fd, "w") as fh:
        fh.write(secret.hex())
    return secret


class CookieSigner:
    def __init__(self, secret: bytes):
        self._secret = secret

    def _mac(self, uid: str) -> str:
        digest = hmac.new(self._secret, uid.encode(), hashlib.sha256).digest()[:16]
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def new(self) -> tuple[str, str]:
        """A new id and the cookie value that carries it."""
        uid = secrets.token_urlsafe(16)
        return uid, f"{uid}.{self._mac(uid)}"

    def verify(self, value: str | None) -> str | None:
        """The id a cookie value carries if this server signed it, else None."""
        uid, _, mac = (value or "").partition(".")
        if not _VALID_ID.fullmatch(uid) or not hmac.compare_digest(mac.encode(), self._mac(uid).encode()):
            return None
        return uid

    def uid_from_cookies(self, cookies: Mapping[str, str] | None) -> str | None:
        return self.verify((cookies or {}).get(COOKIE))


def request_uid(request: Any) -> str | None:
    """The request's anonymous id: its verified cookie's, else the one minted for it."""
    return (getattr(request, "scope", None) or {}).get("state", {}).get(_STATE_KEY)


def _cookie_header(scope: dict[str, Any]) -> dict[str, str]:
    raw = b"; ".join(v for k, v in scope.get("headers", []) if k == b"cookie").decode("latin-1")
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(raw)
    except Exception:  # noqa: BLE001 - a garbled Cookie header is as good as none
        return {}
    return {k: m.value for k, m in jar.items()}


class IdentityMiddleware:
    """Give every browser that has no valid ``chatloop_uid`` cookie a new, signed one."""

    def __init__(self, app: Any, signer: CookieSigner):
        self.app, self.signer = app, signer

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        uid = self.signer.uid_from_cookies(_cookie_header(scope))
        if uid is not None:
            scope.setdefault("state", {})[_STATE_KEY] = uid
            await self.app(scope, receive, send)
            return
        uid, value = self.signer.new()
        scope.setdefault("state", {})[_STATE_KEY] = uid  # what request_uid() returns for this request
        cookie = (f"{COOKIE}={value}; Max-Age={MAX_AGE}; Path=/; HttpOnly; SameSite=Lax").encode()

        async def send_with_cookie(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie)]}
            await send(message)

        await self.app(scope, receive, send_with_cookie)


class NewIdentityLimit:
    """At most ``per_hour`` identities new to a client address within any hour (0 = no limit).

    An identity an address has used before passes for as long as it keeps being used (forgotten
    after ``forget_s`` idle); memory stays bounded by the ceiling times the addresses seen."""

    def __init__(self, per_hour: int, forget_s: float = 86400.0, clock=time.monotonic):
        self.per_hour, self.forget_s, self._clock = per_hour, forget_s, clock
        self._known: dict[str, dict[str, float]] = {}  # address -> identity -> last used
        self._new: dict[str, deque[float]] = {}  # address -> when its new identities appeared
        self._lock = threading.Lock()
        self._last_sweep = clock()

    def admit(self, address: str, identity: str) -> None:
        """Note that ``address`` acts as ``identity``; RateLimited if that is one new identity too many."""
        if self.per_hour <= 0:
            return
        now = self._clock()
        with self._lock:
            known = self._known.setdefault(address, {})
            if identity in known:
                known[identity] = now
                return
            new = self._new.setdefault(address, deque())
            while new and now - new[0] >= 3600:
                new.popleft()
            if len(new) >= self.per_hour:
                wait = 3600 - (now - new[0])
                raise RateLimited(f"too many new users from this address: at most {self.per_hour} an hour; "
                                  f"keep your cookie or user name, use an API key, or try again in "
                                  f"{int(wait) + 1} s", wait)
            new.append(now)
            known[identity] = now
            if now - self._last_sweep > 600:
                self._sweep(now)

    def _sweep(self, now: float) -> None:
        for address in list(self._known):
            self._known[address] = {i: t for i, t in self._known[address].items() if now - t < self.forget_s}
            if not self._known[address] and not self._new.get(address):
                del self._known[address]
                self._new.pop(address, None)
        self._last_sweep = now
