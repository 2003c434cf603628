"""API keys: identities an operator issues, so that caps and limits are not free to dodge.

Owns: creating, listing, revoking and checking keys (``KeyRing``), over the ``api_keys`` table.

Invariants:
- A key is ``clk_<id>_<secret>``: ``id`` (8 hex characters) is public and names the key (its
  user is ``key:<id>``); ``secret`` (32 random bytes) is shown once, at creation, and only its
  SHA-256 is stored. A plain hash is enough for a secret of 256 random bits (no dictionary to
  guess from); the comparison is constant-time.
- A revoked key is refused from the moment ``revoke`` returns (the ring's cache is updated in the
  same call; every writer of keys is this process, the CLI goes through its admin API).
- A key's own ``chat_per_minute``/``feedback_per_minute``/``max_pairs`` replace the service's
  defaults for its user; None keeps them.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
from dataclasses import dataclass
from typing import Any

from chatloop.store import Store, StoreError

PREFIX = "clk_"
_KEY_RE = re.compile(r"clk_([0-9a-f]{8})_([A-Za-z0-9_-]{43})")


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    secret_sha256: str
    revoked: bool
    chat_per_minute: int | None
    feedback_per_minute: int | None
    max_pairs: int | None

    @property
    def user_id(self) -> str:
        return f"key:{self.id}"


def looks_like_key(token: str) -> bool:
    return token.startswith(PREFIX)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _limit(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value > 1_000_000:
        raise StoreError(f"{what} must be a whole number from 0 to 1000000 (or left out)")
    return value


class KeyRing:
    def __init__(self, store: Store):
        self.store = store
        self._lock = threading.Lock()
        self._keys = {r["id"]: self._key(r) for r in store.api_keys()}

    @staticmethod
    def _key(row: dict[str, Any]) -> ApiKey:
        return ApiKey(row["id"], row["name"], row["secret_sha256"], row["revoked_at"] is not None,
                      row["chat_per_minute"], row["feedback_per_minute"], row["max_pairs"])

    def create(self, name: str, chat_per_minute: int | None = None, feedback_per_minute: int | None = None,
               max_pairs: int | None = None) -> tuple[dict[str, Any], str]:
        """A new key: its listing and the key itself (shown this once)."""
        name = (name or "").strip()
        if not name or len(name) > 100 or not name.isprintable():
            raise StoreError("a key needs a name: printable, at most 100 characters")
        limits = (_limit(chat_per_minute, "chat_per_minute"), _limit(feedback_per_minute, "feedback_per_minute"),
                  _limit(max_pairs, "max_pairs"))
        with self._lock:
            key_id = secrets.token_hex(4)
            while key_id in self._keys:
                key_id = secrets.token_hex(4)
            secret = secrets.token_urlsafe(32)
            self.store.add_api_key(key_id, name, _digest(secret), *limits)
            self._keys[key_id] = ApiKey(key_id, name, _digest(secret), False, *limits)
        return self.describe(self._keys[key_id]), f"{PREFIX}{key_id}_{secret}"

    def revoke(self, key_id: str) -> None:
        with self._lock:
            self.store.revoke_api_key(key_id)  # NotFound for an unknown or already revoked key
            key = self._keys[key_id]
            self._keys[key_id] = ApiKey(**{**key.__dict__, "revoked": True})

    def list(self) -> list[dict[str, Any]]:
        rows = {r["id"]: r for r in self.store.api_keys()}
        return [{**self.describe(k), "created_at": str(rows[k.id]["created_at"]),
                 "revoked_at": None if rows[k.id]["revoked_at"] is None else str(rows[k.id]["revoked_at"])}
                for k in self._keys.values() if k.id in rows]

    @staticmethod
    def describe(key: ApiKey) -> dict[str, Any]:
        return {"id": key.id, "name": key.name, "user": key.user_id, "revoked": key.revoked,
                "chat_per_minute": key.chat_per_minute, "feedback_per_minute": key.feedback_per_minute,
                "max_pairs": key.max_pairs}

    def authenticate(self, token: str) -> ApiKey | None:
        """The key ``token`` is, if it is a valid one that is not revoked, else None."""
        m = _KEY_RE.fullmatch(token or "")
        if not m:
            return None
        key = self._keys.get(m.group(1))
        if key is None or key.revoked:
            return None
        return key if hmac.compare_digest(_digest(m.group(2)), key.secret_sha256) else None
