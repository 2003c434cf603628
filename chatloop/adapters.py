"""The adapter registry on disk: versioned PEFT directories, their metadata and the active pointer.

Layout under ``$DATA_DIR/adapters``::

    v1/ adapter_config.json  adapter_model.safetensors  chatloop.json
    v2/ ...
    active.json   {"version": "v2", "history": ["base", "v1"]}
    compare.json  {"version": "v3"}  the candidate on one side of the Compare tab (or null)

Owns: numbering, atomic publish, validation, the active pointer and rollback history.

Invariants:
- A version directory appears only by ``os.rename`` of a fully written temporary directory, so a
  crash never leaves a half-written version; temporary directories (``.tmp-*``) are ignored.
- ``active.json`` is replaced atomically (write + fsync + rename). It names 'base' or a valid
  version; rollback pops the history. Version directories are never modified after publish.
- Anything that fails validation (missing files, unreadable config or weights) is refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from chatloop.errors import ChatloopError

BASE_VERSION = "base"
META_FILE = "chatloop.json"
ACTIVE_FILE = "active.json"
COMPARE_FILE = "compare.json"
_VERSION_RE = re.compile(r"^v([1-9]\d{0,8})$")  # v1 .. v999999999: a name is never too long for a path


class AdapterError(ChatloopError, ValueError):
    """An adapter version is corrupt or cannot be activated."""


class UnknownAdapter(AdapterError):
    """No published adapter has that version name."""
    status, type = 404, "not_found_error"


def _write_json_atomic(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, default=str)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def validate_adapter_dir(path: Path) -> dict[str, Any]:
    """Check that ``path`` is a complete PEFT LoRA directory; return its adapter config."""
    cfg_file = path / "adapter_config.json"
    weights = path / "adapter_model.safetensors"
    if not cfg_file.is_file():
        raise AdapterError(f"{path.name}: adapter_config.json is missing")
    if not weights.is_file():
        raise AdapterError(f"{path.name}: adapter_model.safetensors is missing")
    try:
        config = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{path.name}: adapter_config.json is unreadable ({exc})") from None
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{path.name}: not a LoRA adapter (peft_type={config.get('peft_type')!r})")
    if config.get("use_dora"):
        # the engine serves rows with different adapters in one batch (PEFT's mixed-batch
        # forward), which PEFT does not support for DoRA
        raise AdapterError(f"{path.name}: DoRA adapters cannot be served in mixed batches; use plain LoRA")
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as fh:
            if not list(fh.keys()):
                raise AdapterError(f"{path.name}: adapter weights are empty")
    except AdapterError:
        raise
    except Exception as exc:  # safetensors raises several types for a corrupt file
        raise AdapterError(f"{path.name}: adapter weights are corrupt ({exc})") from None
    return config


class AdapterRegistry:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    # ---- versions ----------------------------------------------------------------------------
    def versions(self) -> list[str]:
        found = []
        for p in self.root.iterdir():
            m = _VERSION_RE.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p.name))
        return [name for _, name in sorted(found)]

    def path(self, version: str) -> Path:
        if not _VERSION_RE.match(version or ""):
            raise UnknownAdapter(f"unknown adapter version {version!r}")
        p = self.root / version
        if not p.is_dir():
            raise UnknownAdapter(f"unknown adapter version {version!r}")
        return p

    def metadata(self, version: str) -> dict[str, Any]:
        p = self.path(version) / META_FILE
        try:
            return json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return {"version": version}

    def list(self) -> list[dict[str, Any]]:
        active = self.active()
        out = []
        for v in self.versions():
            meta = self.metadata(v)
            meta["version"] = v
            meta["active"] = v == active
            out.append(meta)
        return out

    def publish(self, src: Path, metadata: dict[str, Any]) -> str:
        """Copy a finished adapter directory into the registry as the next version.

        The copy is validated, written to a temporary directory and renamed into place.
        """
        validate_adapter_dir(src)
        with self._lock:
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
            try:
                for f in src.iterdir():
                    if f.is_file():
                        shutil.copy2(f, tmp / f.name)
                while True:
                    nums = [int(_VERSION_RE.match(v).group(1)) for v in self.versions()]
                    version = f"v{max(nums, default=0) + 1}"
                    meta = dict(metadata, version=version)
                    (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
                    for f in tmp.iterdir():
                        with open(f, "rb") as fh:
                            os.fsync(fh.fileno())
                    try:
                        os.rename(tmp, self.root / version)
                        return version
                    except OSError:
                        if (self.root / version).exists():
                            continue  # another publisher took this number
                        raise
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise

    # ---- the active pointer ------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        f = self.root / ACTIVE_FILE
        if not f.is_file():
            return {"version": BASE_VERSION, "history": []}
        try:
            state = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            return {"version": BASE_VERSION, "history": []}
        return {"version": state.get("version", BASE_VERSION), "history": state.get("history", [])}

    def active(self) -> str:
        return self._state()["version"]

    def check(self, version: str) -> None:
        """Raise AdapterError unless ``version`` is 'base' or a valid published adapter."""
        if version != BASE_VERSION:
            validate_adapter_dir(self.path(version))

    def set_active(self, version: str) -> str:
        """Point 'active' at ``version`` (validated); returns the previous active version."""
        self.check(version)
        with self._lock:
            state = self._state()
            previous = state["version"]
            if previous != version:
                history = (state["history"] + [previous])[-100:]
                _write_json_atomic(self.root / ACTIVE_FILE, {"version": version, "history": history})
            return previous

    def compare_version(self) -> str | None:
        """The version an operator put into live comparison against the active one, if any."""
        try:
            version = json.loads((self.root / COMPARE_FILE).read_text()).get("version")
        except (OSError, ValueError):
            return None
        return version if version and version in self.versions() else None

    def set_compare_version(self, version: str | None) -> None:
        """Put ``version`` (validated) into live comparison, or stop it with None."""
        if version is not None:
            self.check(version)
        with self._lock:
            _write_json_atomic(self.root / COMPARE_FILE, {"version": version})

    def rollback_target(self) -> str:
        """The version a rollback would re-activate (the last one active before this one)."""
        history = self._state()["history"]
        if not history:
            raise AdapterError("nothing to roll back to: no earlier version was active")
        return history[-1]

    def pop_active(self) -> tuple[str, str]:
        """Roll back: re-activate the previous version; returns (rolled_back, now_active)."""
        with self._lock:
            state = self._state()
            if not state["history"]:
                raise AdapterError("nothing to roll back to: no earlier version was active")
            target = state["history"][-1]
            self.check(target)
            _write_json_atomic(self.root / ACTIVE_FILE,
                               {"version": target, "history": state["history"][:-1]})
            return state["version"], target
