"""What operators do to a running service: retrain, activate, override, roll back, compare,
rate, inspect runs, query the log, export and import.

Owns: the operator half of ``Service`` (a mixin it inherits, so routes, the UI and the CLI call
one object and never reach past it into the store, the registry or the retrainer).

Invariants:
- Activation goes engine -> registry -> store: if the engine refuses an adapter nothing else
  changes, and the registry's pointer never names a version the engine could not load.
- An override needs a reason and a rejected candidate; both are recorded.
- SQL results are JSON values (nested lists and objects for DuckDB's LIST and STRUCT, text for
  dates, decimals, UUIDs and non-finite floats), the same for the API, the UI and the CLI.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from chatloop.adapters import BASE_VERSION
from chatloop.algorithms import parse as parse_algorithm
from chatloop.engine import InvalidRequest
from chatloop.errors import ChatloopError, Conflict
from chatloop.loop import TrainingFailed
from chatloop.run_status import RunStatus

if TYPE_CHECKING:  # the attributes ``Service`` gives this mixin
    from chatloop.adapters import AdapterRegistry
    from chatloop.config import Settings
    from chatloop.engine import Engine
    from chatloop.loop import Retrainer
    from chatloop.store import Store

log = logging.getLogger(__name__)


class NotOverridable(Conflict):
    """Only a candidate the gate rejected can be promoted by override."""


def to_json_value(v: Any) -> Any:
    """A DuckDB value as JSON: scalars as they are, LIST/STRUCT/MAP nested, anything else as text."""
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, (list, tuple)):
        return [to_json_value(x) for x in v]
    if isinstance(v, dict):
        return {str(k): to_json_value(x) for k, x in v.items()}
    return str(v)


def run_sql(store: "Store", limits: Any, query: str, max_rows: int | None = None) -> dict[str, Any]:
    """One read statement under the ``[limits]`` caps: {columns, rows (JSON values), truncated}
    (SqlRefused); what the service and the CLI without a service both answer."""
    res = store.query_readonly(query, min(max_rows or limits.sql_max_rows, limits.sql_max_rows),
                               limits.sql_timeout_s, limits.sql_max_bytes)
    return {"columns": res.columns, "rows": [[to_json_value(v) for v in r] for r in res.rows],
            "truncated": res.truncated}


class Operations:
    settings: "Settings"
    store: "Store"
    registry: "AdapterRegistry"
    engine: "Engine"
    retrainer: "Retrainer"

    @property
    def active_version(self) -> str:
        return self.engine.active_version

    # ---- versions ----------------------------------------------------------------------------
    def adapters(self) -> list[dict[str, Any]]:
        return self.registry.list()

    def activate(self, version: str, actor: str = "operator", reason: str = "") -> str:
        previous = self.engine.activate(version)
        self.registry.set_active(version)
        self.store.record_activation(version, previous, actor, reason)
        log.info("activated %s (was %s) by %s", version, previous, actor)
        return previous

    def override(self, run_id: int, reason: str, actor: str = "operator") -> str:
        """Promote a candidate the gate rejected; the override and its reason are recorded with
        the run and the activation. Returns the previously active version."""
        reason = (reason or "").strip()
        if not reason:
            raise InvalidRequest("say why you override the gate (a reason is required)")
        run = self.store.get_run(run_id)  # NotFound
        if run["status"] != RunStatus.REJECTED or not run.get("candidate_version"):
            raise NotOverridable(f"run {run_id} is {run['status']}: only a rejected candidate can be promoted "
                                 f"by override")
        version = run["candidate_version"]
        previous = self.activate(version, actor="override", reason=f"{actor} overrode the gate: {reason}")
        self.store.update_run(run_id, status=RunStatus.OVERRIDDEN, override=f"{actor}: {reason}")
        return previous

    def rollback(self, actor: str = "operator") -> tuple[str, str]:
        target = self.registry.rollback_target()
        previous = self.engine.activate(target)
        self.registry.pop_active()
        self.store.record_activation(target, previous, "rollback", f"rolled back by {actor}")
        return previous, target

    def set_live_comparison(self, version: str | None) -> None:
        """Serve ``version`` (a published candidate) on one side of the Compare tab, against the
        active version, until stopped with None."""
        if version is not None and version in (BASE_VERSION, self.engine.active_version):
            raise InvalidRequest(f"{version} is already what serves; pick a candidate version")
        self.registry.set_compare_version(version)

    def live_comparison(self) -> str | None:
        version = self.registry.compare_version()
        return None if version == self.engine.active_version else version

    def ratings(self, bootstrap: int = 200) -> list[dict[str, Any]]:
        """Bradley-Terry ratings of adapter versions from A/B votes (see ``chatloop.ratings``)."""
        from chatloop.ratings import rate

        votes = [(a, b, c) for _, a, b, c in self.store.version_votes()]
        return [asdict(r) for r in rate(votes, bootstrap=bootstrap)]

    def liked_by_version(self) -> list[dict[str, Any]]:
        """Each served version's liked share from real users' thumbs, with its 95 % interval and
        the gate's verdict on it, in serving order (``chatloop.liked``)."""
        from chatloop.liked import liked_by_version

        return liked_by_version(self.store.version_thumbs(), self.store.first_activations(),
                                self.store.candidate_verdicts())

    def version_votes(self) -> list[tuple[Any, str, str, str]]:
        """(time, version of A, version of B, choice) of every A/B vote between versions, oldest first."""
        return self.store.version_votes()

    # ---- retraining --------------------------------------------------------------------------
    def retrain(self, algo: str, trigger: str, wait: bool = False,
                on_progress: Callable[[Any], None] | None = None) -> int | dict[str, Any]:
        """Start a cycle (its run id) or, with ``wait``, run it to the end (its run record).
        CycleBusy / NotEnoughFeedback when it cannot start; TrainingFailed when it failed after
        it started (its run is recorded as failed)."""
        algorithm = parse_algorithm(algo)
        if not wait:
            return self.retrainer.start_cycle(algorithm, trigger=trigger)
        try:
            progress = {"on_progress": on_progress} if on_progress else {}
            return self.retrainer.run_cycle(algorithm, trigger=trigger, **progress)
        except ChatloopError:  # CycleBusy, NotEnoughFeedback, TrainingFailed
            raise
        except Exception as exc:
            raise TrainingFailed(f"the retraining cycle failed: {type(exc).__name__}: {exc}") from exc

    def cancel_retraining(self) -> bool:
        return self.retrainer.cancel()

    def runs(self, limit: int = 50) -> list[dict[str, Any]]:
        return self.store.list_runs(min(max(limit, 1), 500))

    def run(self, run_id: int) -> dict[str, Any]:
        """A run's record (NotFound), with its live progress while it is the current cycle."""
        r = self.store.get_run(run_id)
        cur = self.retrainer.current
        r["progress"] = cur.as_dict() if cur and cur.run_id == run_id else None
        return r

    def status(self) -> dict[str, Any]:
        cur = self.retrainer.current
        return {
            "model": self.model_name,
            "device": str(self.loaded.device),
            "dtype": str(self.loaded.dtype).replace("torch.", ""),
            "serve_weights": self.serve_weights,
            "active_adapter": self.engine.active_version,
            "queue_depth": self.engine.queue_depth(),
            "running_requests": self.engine.running(),
            "cycle": cur.as_dict() if cur else None,
            "feedback_events": self.store.feedback_count(),
            "reconciled_at_startup": self.reconciled,
        }

    # ---- the log -----------------------------------------------------------------------------
    def sql(self, query: str, max_rows: int | None = None) -> dict[str, Any]:
        """One read statement under the ``[limits]`` caps: {columns, rows, truncated} (SqlRefused)."""
        return run_sql(self.store, self.settings.limits, query, max_rows)

    def browse_feedback(self, **filters: Any) -> list[dict[str, Any]]:
        """Thumbs and A/B votes with their replies, newest first (``Store.browse_feedback``'s filters)."""
        return self.store.browse_feedback(**filters)

    def export(self, what: str, fmt: str) -> bytes:
        from chatloop.export import encode, export_rows

        return encode(export_rows(self.store, what, self.settings.training), fmt)

    def import_file(self, kind: str, path: Path, limit: int | None = None,
                    on_item: Callable[[int], None] = lambda i: None) -> dict[str, Any]:
        """Replay a public data set into the log: OpenAssistant trees or HH-RLHF pairs (ValueError,
        KeyError, TypeError or OSError for a file that is not one)."""
        from chatloop import importers

        if kind == "oasst":
            return importers.import_oasst(self.store, path, on_tree=on_item).as_dict()
        return importers.import_hh(self.store, path, limit, on_row=on_item).as_dict()
