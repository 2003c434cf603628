"""Start-up reconciliation: after a crash, make the runs, the adapter rows, the activation log and
the registry on disk agree again, and say what was done.

Owns: the repairs a restarted service makes before it serves, in this order:
1. A trainer child left by a killed service (its pid is in the run's ``child.pid``) is killed;
   its run, still ``running``, becomes ``failed``.
2. A version on disk whose ``adapters`` row is missing (killed while publishing) gets its row
   back from the version's own metadata.
3. A run that published a version but never finished gets that version as its candidate: it is
   ``promoted`` if the registry serves it (killed after activating), ``staged`` if it is the live
   comparison's candidate, else it stays ``failed`` with a note that the candidate exists but was
   never activated (an operator may activate it; the public cannot request it).
4. If the registry's active version is not the activation log's latest, the activation is
   recorded (actor ``startup``), since the registry is what the engine serves.

Invariants: the registry on disk is the truth for what exists and what serves (it is written
atomically, and the engine loads from it); the database is brought in line with it, never the
other way round. Nothing is activated or deleted here. Running it twice changes nothing more.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

from chatloop.adapters import AdapterError, AdapterRegistry
from chatloop.run_status import RunStatus
from chatloop.store import NotFound, Store

log = logging.getLogger(__name__)

CHILD_PID_FILE = "child.pid"
INTERRUPTED = "the service stopped while this run was in progress"


def _kill_orphan(job_dir: Path) -> str | None:
    """Kill the trainer a dead service left running in ``job_dir``, if it still runs."""
    try:
        pid = int((job_dir / CHILD_PID_FILE).read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, ValueError):
        return None
    if "chatloop.train.runner" not in cmdline or str(job_dir) not in cmdline:
        return None  # the pid was reused by another process
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        return None
    return f"killed trainer process {pid} left running by the stopped service"


def reconcile(store: Store, registry: AdapterRegistry) -> list[str]:
    """Repair what a crash left inconsistent; returns one line per repair (empty: all agreed)."""
    done: list[str] = []
    for run in store.running_runs():
        if run.get("snapshot_dir"):
            killed = _kill_orphan(Path(run["snapshot_dir"]))
            if killed:
                done.append(f"run {run['id']}: {killed}")
        store.finish_run(run["id"], RunStatus.FAILED, error=INTERRUPTED)
        done.append(f"run {run['id']}: marked failed ({INTERRUPTED})")

    active, compare = registry.active(), registry.compare_version()
    recorded = store.recorded_adapters()
    for version in registry.versions():
        try:
            meta = registry.metadata(version)
        except AdapterError:
            continue
        run_id = meta.get("run_id")
        if version not in recorded:
            store.record_adapter(version, meta.get("parent", "base"), meta.get("algo", "?"), run_id,
                                 str(registry.path(version)), meta.get("metrics") or {})
            done.append(f"{version}: recorded the adapter row a crash during publishing left out")
        if run_id is None:
            continue
        try:
            run = store.get_run(int(run_id))
        except NotFound:
            continue
        if run.get("candidate_version"):
            continue  # the run finished and knows its candidate
        verdict = meta.get("verdict") or ""
        if version == active:
            store.finish_run(run["id"], RunStatus.PROMOTED, candidate_version=version, error=None,
                             verdict=f"{verdict} (finished at start-up: the service stopped after activating {version})")
            done.append(f"run {run['id']}: promoted, since {version} serves (the service stopped after activating it)")
        elif version == compare:
            store.finish_run(run["id"], RunStatus.STAGED, candidate_version=version, error=None,
                             verdict=f"staged: {verdict} (finished at start-up)")
            done.append(f"run {run['id']}: staged, since {version} is in live comparison")
        else:
            store.update_run(run["id"], candidate_version=version,
                             error=f"{run.get('error') or INTERRUPTED}; its candidate {version} was published but "
                                   f"never activated (gate: {verdict or 'unknown'})")
            done.append(f"run {run['id']}: failed, its published candidate {version} was never activated")

    logged = store.last_activation()
    if active != (logged or "base"):
        store.record_activation(active, logged or "base", "startup",
                                f"reconciled at start-up: the registry serves {active}, the log said {logged or 'base'}")
        done.append(f"recorded the activation of {active} that a crash left out of the log (it said {logged or 'base'})")
    for line in done:
        log.warning("start-up reconciliation: %s", line)
    return done
