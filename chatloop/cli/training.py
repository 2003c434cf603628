"""``chatloop retrain``: one cycle, through the running service or on the data directory, with a
progress bar per training phase."""

from __future__ import annotations

import sys
import time
from typing import Any

from chatloop.cli.remote import Local, find_service
from chatloop.config import Settings
from chatloop.run_status import RunStatus


class PhaseBars:
    """One tqdm bar per training phase (e.g. "reward model", then "ppo"), on stderr, with the
    latest loss (and mean reward, for PPO) beside it."""

    def __init__(self) -> None:
        self.bar, self.phase = None, None

    def show(self, phase: str, step: int, total: int, last: dict[str, Any] | None) -> None:
        from tqdm import tqdm

        if not total:
            return
        if self.bar is None or phase != self.phase:
            self.close()
            self.bar, self.phase = tqdm(total=total, desc=phase or "training", unit="step", file=sys.stderr), phase
        self.bar.update(step - self.bar.n)
        if last:
            shown = {k: f"{last[k]:.4f}" for k in ("loss", "mean_reward", "kl") if isinstance(last.get(k), (int, float))}
            self.bar.set_postfix(shown)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def retrain(settings: Settings, algo: str, url: str | None, trigger: str = "cli") -> int:
    remote = find_service(settings, url)
    if remote is not None:
        started = remote.call("POST", "/admin/retrain", json={"algo": algo})
        run_id = started["run_id"]
        print(f"retraining run {run_id} started on the running service", file=sys.stderr)
        bars = PhaseBars()
        try:
            while True:
                run = remote.call("GET", f"/admin/runs/{run_id}")
                prog = run.get("progress") or {}
                bars.show(prog.get("phase", ""), prog.get("step", 0), prog.get("total", 0), prog.get("last"))
                if run["status"] != RunStatus.RUNNING:
                    break
                time.sleep(0.5)
        finally:
            bars.close()
        return _report(run)

    from chatloop.loop import NotEnoughFeedback, Retrainer
    from chatloop.models import materialize

    local = Local(settings)
    source = materialize(settings.model, settings.models_dir)
    retrainer = Retrainer(settings, local.store, local.registry, source.path,
                          activate=local.activate, active_version=local.registry.active)
    bars = PhaseBars()

    def on_progress(cur) -> None:
        bars.show(cur.phase, cur.step, cur.total, cur.last)

    try:
        run = retrainer.run_cycle(algo, trigger=trigger, on_progress=on_progress)
    except NotEnoughFeedback as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        print(f"error: retraining failed: {exc}", file=sys.stderr)
        return 1
    finally:
        bars.close()
    return _report(run)


def _report(run: dict[str, Any]) -> int:
    status = run["status"]
    if status == RunStatus.REFUSED:
        print(f"error: {run.get('error')}", file=sys.stderr)
        return 2
    if status == RunStatus.FAILED:
        print(f"error: retraining failed: {run.get('error')}", file=sys.stderr)
        return 1
    print(f"run {run['id']}: {status} {run.get('candidate_version') or ''} — {run.get('verdict') or ''}")
    return 0
