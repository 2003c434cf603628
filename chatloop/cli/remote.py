"""How a command reaches the data: the running service's HTTP API when one answers, else the
data directory itself.

Owns: ``Remote`` (the admin API with the operator token), ``find_service`` and ``Local``.
Invariant: when a service runs on the data directory, commands talk to it and never open the
DuckDB file (one process owns it); only when none runs do they open it directly.
"""

from __future__ import annotations

import json
from typing import Any

from chatloop.config import Settings


class Remote:
    def __init__(self, url: str, token: str):
        import httpx

        self.client = httpx.Client(base_url=url, timeout=60,
                                   headers={"Authorization": f"Bearer {token}"} if token else {})

    def call(self, method: str, path: str, **kw: Any) -> Any:
        r = self.client.request(method, path, **kw)
        try:
            body = r.json()
        except ValueError:
            body = {"error": {"message": r.text}}
        if r.status_code >= 400:
            raise SystemExit(f"error: {body.get('error', {}).get('message', body)}")
        return body


def find_service(settings: Settings, url: str | None) -> Remote | None:
    """The running service on this data directory (or at --url), if any answers."""
    import httpx

    token = settings.admin_token
    explicit = url is not None
    if not explicit:
        try:
            info = json.loads(settings.service_file.read_text())
        except (OSError, ValueError):
            return None
        url, token = info["url"], token or info.get("admin_token", "")
    try:
        httpx.get(url.rstrip("/") + "/healthz", timeout=5).raise_for_status()
    except httpx.HTTPError:
        if explicit:
            raise SystemExit(f"error: no chatloop service answers at {url}")
        return None  # a stale service.json: the service is gone
    return Remote(url, token)


class Local:
    """Direct access to the data directory when no service runs. With no engine to load an
    adapter, activation and rollback move the registry's pointer (which validates the adapter's
    files) and log it; the service loads it when it starts, or serves base and says why."""

    def __init__(self, settings: Settings):
        from chatloop.adapters import AdapterRegistry
        from chatloop.store import Store

        self.settings = settings
        self.store = Store(settings.db_path)
        self.registry = AdapterRegistry(settings.adapters_dir)

    def activate(self, version: str, actor: str, reason: str) -> str:
        previous = self.registry.set_active(version)
        self.store.record_activation(version, previous, actor, reason)
        return previous

    def rollback(self, reason: str) -> tuple[str, str]:
        previous, target = self.registry.pop_active()
        self.store.record_activation(target, previous, "rollback", reason)
        return previous, target
