"""The scheduler: triggers from settings, coalescing, and a busy or empty cycle that is skipped."""

from __future__ import annotations

from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from chatloop.config import Settings
from chatloop.loop import CycleBusy, NotEnoughFeedback
from jobs.scheduler import build_scheduler, scheduled_retrain


class FakeRetrainer:
    def __init__(self, exc=None):
        self.calls, self.exc = [], exc

    def run_cycle(self, algo, trigger):
        self.calls.append((algo, trigger))
        if self.exc:
            raise self.exc
        return {"id": 1, "status": "promoted"}


def test_no_schedule_means_no_jobs():
    assert build_scheduler(Settings(), FakeRetrainer()).get_jobs() == []


def test_cron_and_interval_jobs_coalesce_and_never_overlap():
    s = Settings(retrain_cron="0 3 * * *", retrain_interval_minutes=30)
    scheduler = build_scheduler(s, FakeRetrainer())
    scheduler.start(paused=True)  # job defaults apply once the scheduler starts
    jobs = {j.id: j for j in scheduler.get_jobs()}
    scheduler.shutdown(wait=False)
    assert isinstance(jobs["retrain-cron"].trigger, CronTrigger)
    assert isinstance(jobs["retrain-interval"].trigger, IntervalTrigger)
    for j in jobs.values():
        assert j.coalesce and j.max_instances == 1


def test_scheduled_tick_runs_a_cycle_and_skips_when_busy_or_empty():
    ok = FakeRetrainer()
    scheduled_retrain(ok, "dpo")
    assert ok.calls == [("dpo", "schedule")]
    for exc in (CycleBusy("running"), NotEnoughFeedback("few"), RuntimeError("boom")):
        r = FakeRetrainer(exc)
        scheduled_retrain(r, "dpo")  # logged, never raised into the scheduler thread
        assert r.calls == [("dpo", "schedule")]
