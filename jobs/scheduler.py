"""The service's one APScheduler 3.x scheduler: when retraining cycles start by themselves.

Owns: the retraining schedules (cron, interval, "after N new feedback events"), their persistence
in the store's ``schedules`` table, the APScheduler jobs built from them, and the job functions.

Invariants:
- Exactly one scheduler per service process; ``cli.serve`` (the composition root) creates it.
- Schedules added at run time (API, Admin tab, CLI) live in DuckDB and are rebuilt into jobs at
  every start, so they survive a restart. Schedules from settings (``retrain_cron``,
  ``retrain_interval_minutes``) are rebuilt from the settings and are not editable at run time.
- Every trigger goes through the same ``Retrainer``, so "one cycle at a time" holds: a tick that
  finds a cycle running is skipped with a log line (a feedback schedule keeps its mark and fires
  at the next poll). The feedback poll starts its cycle in the background and returns; cron and
  interval jobs run theirs in the scheduler's thread. Missed runs are coalesced into one
  (``coalesce=True``), never repeated, and a job never runs twice at once (``max_instances=1``).
- With ``gate_live_votes`` set, a second job settles staged candidates (see ``Retrainer.
  settle_live_comparisons``) every ``poll_seconds``.
- A feedback schedule fires when ``Store.feedback_count()`` (thumbs + A/B votes that can train:
  imported held-out rows do not count) has grown by N
  since it last fired or was created; the count is checked every ``poll_seconds``.
"""

from __future__ import annotations

import logging
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from chatloop.config import Settings
from chatloop.errors import ChatloopError
from chatloop.algorithms import NAMES as ALGORITHMS
from chatloop.loop import CycleBusy, NotEnoughFeedback, Retrainer
from chatloop.store import NotFound, Store

log = logging.getLogger(__name__)
# APScheduler logs two INFO lines per job execution: every poll_seconds, for the feedback poll. Its
# warnings (skipped or missed runs) and errors still show; this module logs what each job did.
logging.getLogger("apscheduler.executors.default").setLevel(logging.WARNING)

JOB_DEFAULTS = {"coalesce": True, "max_instances": 1, "misfire_grace_time": 3600}
KINDS = ("cron", "interval", "feedback")


class ScheduleError(ChatloopError, ValueError):
    """A schedule that cannot be built (bad kind, crontab line, number or algorithm)."""


def scheduled_retrain(retrainer: Retrainer, algo: str, trigger: str = "schedule") -> dict[str, Any] | None:
    """Run one cycle for a schedule; never raises into the scheduler thread."""
    try:
        run = retrainer.run_cycle(algo, trigger=trigger)
        log.info("%s retraining run %s: %s", trigger, run["id"], run["status"])
        return run
    except (CycleBusy, NotEnoughFeedback) as exc:
        log.info("%s retraining skipped: %s", trigger, exc)
    except Exception:
        log.exception("%s retraining failed", trigger)
    return None


def build_trigger(kind: str, spec: str) -> CronTrigger | IntervalTrigger | None:
    """The APScheduler trigger for a schedule (None for feedback schedules, which are polled)."""
    if kind == "cron":
        try:
            return CronTrigger.from_crontab(spec, timezone="UTC")
        except ValueError as exc:
            raise ScheduleError(f"bad crontab line {spec!r}: {exc}") from None
    if kind in ("interval", "feedback"):
        try:
            n = int(spec)
        except (TypeError, ValueError):
            n = 0
        if n < 1:
            what = "minutes" if kind == "interval" else "new feedback events"
            raise ScheduleError(f"a {kind} schedule needs a positive whole number of {what} (got {spec!r})")
        return IntervalTrigger(minutes=n) if kind == "interval" else None
    raise ScheduleError(f"unknown schedule kind {kind!r}; use one of {', '.join(KINDS)}")


class RetrainScheduler:
    def __init__(self, settings: Settings, retrainer: Retrainer, store: Store, poll_seconds: float = 30):
        self.settings = settings
        self.retrainer = retrainer
        self.store = store
        self.poll_seconds = poll_seconds
        self.scheduler = BackgroundScheduler(job_defaults=JOB_DEFAULTS, timezone="UTC")

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self, paused: bool = False) -> RetrainScheduler:
        algo = self.settings.training.algo
        if self.settings.retrain_cron:
            self.scheduler.add_job(scheduled_retrain, build_trigger("cron", self.settings.retrain_cron),
                                   args=[self.retrainer, algo, "schedule:settings-cron"],
                                   id="settings-cron", replace_existing=True)
        if self.settings.retrain_interval_minutes > 0:
            self.scheduler.add_job(scheduled_retrain,
                                   IntervalTrigger(minutes=self.settings.retrain_interval_minutes),
                                   args=[self.retrainer, algo, "schedule:settings-interval"],
                                   id="settings-interval", replace_existing=True)
        for row in self.store.list_schedules():
            try:
                self._add_job(row)
            except ScheduleError as exc:  # a row from an older version that no longer parses
                log.error("schedule %s is not started: %s", row["id"], exc)
        self.scheduler.add_job(self.poll_feedback, IntervalTrigger(seconds=self.poll_seconds),
                               id="feedback-poll", replace_existing=True)
        if self.settings.training.gate_live_votes > 0:
            self.scheduler.add_job(self.settle_live, IntervalTrigger(seconds=self.poll_seconds),
                                   id="live-comparison", replace_existing=True)
        self.scheduler.start(paused=paused)
        return self

    def shutdown(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)

    # ---- operator actions ------------------------------------------------------------------
    def add(self, kind: str, spec: str | int, algo: str, created_by: str = "operator") -> dict[str, Any]:
        spec = str(spec).strip()
        if algo not in ALGORITHMS:
            raise ScheduleError(f"unknown algorithm {algo!r}; use one of {', '.join(ALGORITHMS)}")
        build_trigger(kind, spec)  # validate before anything is stored
        schedule_id = self.store.add_schedule(kind, spec, algo, created_by)
        row = self.store.get_schedule(schedule_id)
        self._add_job(row)
        return self._describe(row)

    def remove(self, schedule_id: int) -> None:
        self.store.remove_schedule(schedule_id)  # NotFound for an unknown id
        job = self.scheduler.get_job(self._job_id(schedule_id))
        if job is not None:
            job.remove()

    def run_now(self, schedule_id: int) -> int:
        """Start the schedule's cycle at once in the background; returns the run id (CycleBusy
        and NotEnoughFeedback propagate to the caller, who asked for it now)."""
        row = self.store.get_schedule(schedule_id)
        run_id = self.retrainer.start_cycle(row["algo"], trigger=f"manual:schedule-{schedule_id}")
        self.store.schedule_fired(schedule_id, run_id, self.store.feedback_count())
        return run_id

    def list(self) -> list[dict[str, Any]]:
        out = []
        for job_id, kind, spec in (("settings-cron", "cron", self.settings.retrain_cron),
                                   ("settings-interval", "interval", str(self.settings.retrain_interval_minutes))):
            job = self.scheduler.get_job(job_id)
            if job is not None:
                out.append({"id": job_id, "kind": kind, "spec": spec, "algo": self.settings.training.algo,
                            "source": "settings", "next_run": _iso(getattr(job, "next_run_time", None))})
        count = self.store.feedback_count()
        return out + [self._describe(row, count) for row in self.store.list_schedules()]

    # ---- jobs ------------------------------------------------------------------------------
    def poll_feedback(self) -> list[int]:
        """Start a cycle for every feedback schedule whose N new events have arrived; returns the
        run ids. The cycle runs in its own thread (``Retrainer.start_cycle``), so this poll returns
        at once: run inline, it held the poll job for the whole cycle and APScheduler logged a
        skipped-execution warning every ``poll_seconds`` meanwhile (81 lines in one 40-minute run)."""
        count = self.store.feedback_count()
        runs = []
        for row in self.store.list_schedules():
            if row["kind"] != "feedback" or count - row["feedback_mark"] < int(row["spec"]):
                continue
            try:
                run_id = self.retrainer.start_cycle(row["algo"], trigger=f"feedback:schedule-{row['id']}")
            except CycleBusy as exc:
                log.info("feedback schedule %s waits: %s", row["id"], exc)
                continue  # keeps its mark: fires at the next poll
            except NotEnoughFeedback as exc:
                log.info("feedback schedule %s: %s", row["id"], exc)
                run_id = None
            except Exception:
                log.exception("feedback schedule %s failed", row["id"])
                run_id = None
            else:
                log.info("feedback schedule %s started retraining run %s", row["id"], run_id)
            self.store.schedule_fired(row["id"], run_id, count)
            if run_id is not None:
                runs.append(run_id)
        return runs

    def settle_live(self) -> None:
        """Promote or reject staged candidates whose live A/B votes are in (never raises)."""
        try:
            for run in self.retrainer.settle_live_comparisons():
                log.info("live comparison decided run %s: %s", run["id"], run["status"])
        except Exception:
            log.exception("settling live comparisons failed")

    def _fire(self, schedule_id: int) -> None:
        try:
            row = self.store.get_schedule(schedule_id)
        except NotFound:
            return  # removed meanwhile
        run = scheduled_retrain(self.retrainer, row["algo"], f"{row['kind']}:schedule-{schedule_id}")
        self.store.schedule_fired(schedule_id, run["id"] if run else None, self.store.feedback_count())

    def _add_job(self, row: dict[str, Any]) -> None:
        trigger = build_trigger(row["kind"], row["spec"])
        if trigger is not None:
            self.scheduler.add_job(self._fire, trigger, args=[row["id"]], id=self._job_id(row["id"]),
                                   replace_existing=True)

    @staticmethod
    def _job_id(schedule_id: int) -> str:
        return f"schedule-{schedule_id}"

    def _describe(self, row: dict[str, Any], feedback_count: int | None = None) -> dict[str, Any]:
        job = self.scheduler.get_job(self._job_id(row["id"]))
        d = {"id": row["id"], "kind": row["kind"], "spec": row["spec"], "algo": row["algo"],
             "source": row["created_by"], "last_fired_at": _iso(row["last_fired_at"]),
             "last_run_id": row["last_run_id"], "next_run": _iso(getattr(job, "next_run_time", None)) if job else None}
        if row["kind"] == "feedback":
            count = self.store.feedback_count() if feedback_count is None else feedback_count
            d["events_until_next"] = max(0, row["feedback_mark"] + int(row["spec"]) - count)
        return d


def _iso(t: Any) -> str | None:
    return t.isoformat(timespec="seconds") if t is not None else None
