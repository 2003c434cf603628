"""The scheduler: every trigger (cron, interval, after N feedback events, manual), schedules that
survive a restart, coalescing, a busy or empty cycle that is skipped, and the CLI/API surface."""

from __future__ import annotations

import datetime as dt
import threading
import time

import httpx
import pytest
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from chatloop.config import Settings
from chatloop.loop import CycleBusy, NotEnoughFeedback
from chatloop.store import NotFound, Store
from conftest import ADMIN_TOKEN, log_reply, start_server, stop_server
from jobs.scheduler import RetrainScheduler, ScheduleError, scheduled_retrain


class FakeRetrainer:
    """Records what the scheduler asks for; raises ``exc`` when set."""

    def __init__(self, exc=None):
        self.calls, self.exc = [], exc
        self.fired = threading.Event()

    def run_cycle(self, algo, trigger):
        self.calls.append((algo, trigger))
        self.fired.set()
        if self.exc:
            raise self.exc
        return {"id": len(self.calls), "status": "promoted"}

    def start_cycle(self, algo, trigger):
        self.calls.append((algo, trigger))
        if self.exc:
            raise self.exc
        return 99


def thumbs(store: Store, n: int) -> None:
    for i in range(n):
        msg = log_reply(store, store.new_conversation("u", "chat"), [{"role": "user", "content": f"q{i}"}], "r")
        store.record_feedback(msg, "u", 1, None, None)


def test_no_schedule_means_only_the_feedback_poll(store):
    sched = RetrainScheduler(Settings(), FakeRetrainer(), store).start(paused=True)
    try:
        assert [j.id for j in sched.scheduler.get_jobs()] == ["feedback-poll"]
        assert sched.list() == []
    finally:
        sched.shutdown()


def test_settings_and_stored_schedules_coalesce_never_overlap_and_survive_a_restart(tmp_path):
    path = tmp_path / "log.duckdb"
    store = Store(path)
    settings = Settings(retrain_cron="0 3 * * *", retrain_interval_minutes=30)
    sched = RetrainScheduler(settings, FakeRetrainer(), store).start(paused=True)
    cron = sched.add("cron", "15 4 * * 1", "kto")
    every = sched.add("interval", "90", "dpo")
    after = sched.add("feedback", "25", "ppo")
    jobs = {j.id: j for j in sched.scheduler.get_jobs()}
    assert isinstance(jobs["settings-cron"].trigger, CronTrigger)
    assert isinstance(jobs["settings-interval"].trigger, IntervalTrigger)
    assert isinstance(jobs[f"schedule-{cron['id']}"].trigger, CronTrigger)
    assert jobs[f"schedule-{every['id']}"].trigger.interval == dt.timedelta(minutes=90)
    for j in jobs.values():
        assert j.coalesce and j.max_instances == 1
    sched.shutdown()
    store.close()

    store = Store(path)  # a restart: the stored schedules come back as jobs
    sched = RetrainScheduler(Settings(), FakeRetrainer(), store).start(paused=True)
    try:
        listed = {j["id"]: j for j in sched.list()}
        assert set(listed) == {cron["id"], every["id"], after["id"]}
        assert (listed[cron["id"]]["kind"], listed[cron["id"]]["spec"], listed[cron["id"]]["algo"]) == \
            ("cron", "15 4 * * 1", "kto")
        assert listed[after["id"]]["events_until_next"] == 25
        assert sched.scheduler.get_job(f"schedule-{every['id']}") is not None
        sched.remove(every["id"])
        assert sched.scheduler.get_job(f"schedule-{every['id']}") is None
        assert every["id"] not in {j["id"] for j in sched.list()}
        with pytest.raises(NotFound):
            sched.remove(every["id"])
    finally:
        sched.shutdown()
        store.close()


@pytest.mark.parametrize("kind, spec, algo, message", [
    ("cron", "every day", "dpo", "crontab"),
    ("cron", "61 * * * *", "dpo", "crontab"),
    ("interval", "0", "dpo", "positive whole number"),
    ("interval", "soon", "dpo", "positive whole number"),
    ("feedback", "-5", "dpo", "positive whole number"),
    ("weekly", "1", "dpo", "unknown schedule kind"),
    ("interval", "5", "sft", "unknown algorithm"),
])
def test_bad_schedules_are_refused_and_nothing_is_stored(store, kind, spec, algo, message):
    sched = RetrainScheduler(Settings(), FakeRetrainer(), store)
    with pytest.raises(ScheduleError, match=message):
        sched.add(kind, spec, algo)
    assert store.list_schedules() == []


def test_a_due_job_runs_its_cycle_through_the_scheduler_thread(store):
    fake = FakeRetrainer()
    sched = RetrainScheduler(Settings(), fake, store).start()
    try:
        job = sched.add("interval", "60", "kto")
        sched.scheduler.get_job(f"schedule-{job['id']}").modify(next_run_time=dt.datetime.now(dt.timezone.utc))
        assert fake.fired.wait(20), "the due job did not run"
        assert fake.calls == [("kto", f"interval:schedule-{job['id']}")]
        deadline = time.monotonic() + 10
        while store.get_schedule(job["id"])["last_run_id"] is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.get_schedule(job["id"])["last_run_id"] == 1
    finally:
        sched.shutdown()


def test_feedback_trigger_fires_after_n_new_events_once(store):
    thumbs(store, 2)  # feedback from before the schedule existed does not count
    fake = FakeRetrainer()
    sched = RetrainScheduler(Settings(), fake, store)
    job = sched.add("feedback", "3", "dpo")
    assert sched.poll_feedback() == [] and fake.calls == []
    thumbs(store, 2)
    assert sched.poll_feedback() == []
    thumbs(store, 1)
    assert sched.poll_feedback() == [99]  # started in the background: the poll does not wait for it
    assert fake.calls == [("dpo", f"feedback:schedule-{job['id']}")]
    assert store.get_schedule(job["id"])["last_run_id"] == 99
    assert sched.poll_feedback() == []  # the mark moved: the next cycle needs 3 more events
    assert sched.list()[0]["events_until_next"] == 3


def test_a_busy_cycle_keeps_the_feedback_mark_and_an_empty_one_moves_it(store):
    busy = FakeRetrainer(CycleBusy("a cycle is running"))
    sched = RetrainScheduler(Settings(), busy, store)
    job = sched.add("feedback", "1", "dpo")
    thumbs(store, 1)
    sched.poll_feedback()
    assert store.get_schedule(job["id"])["last_fired_at"] is None  # it waits for the next poll
    sched.retrainer = FakeRetrainer(NotEnoughFeedback("only 1 pair"))
    sched.poll_feedback()
    assert store.get_schedule(job["id"])["last_fired_at"] is not None
    assert sched.list()[0]["events_until_next"] == 1


def test_manual_run_of_a_schedule_and_scheduled_ticks_never_raise(store):
    fake = FakeRetrainer()
    sched = RetrainScheduler(Settings(), fake, store)
    job = sched.add("cron", "0 3 * * *", "ppo")
    assert sched.run_now(job["id"]) == 99
    assert fake.calls == [("ppo", f"manual:schedule-{job['id']}")]
    with pytest.raises(NotFound):
        sched.run_now(12345)
    sched.retrainer = FakeRetrainer(CycleBusy("running"))
    with pytest.raises(CycleBusy):  # asked for now: the caller hears why not
        sched.run_now(job["id"])
    for exc in (CycleBusy("running"), NotEnoughFeedback("few"), RuntimeError("boom")):
        r = FakeRetrainer(exc)
        assert scheduled_retrain(r, "dpo") is None  # logged, never raised into the scheduler thread
        assert r.calls == [("dpo", "schedule")]


def test_schedules_through_the_api_and_cli_survive_a_service_restart(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    server = start_server(data, str(tiny_model_dir))
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    try:
        bad = httpx.post(server.url + "/admin/jobs", json={"kind": "cron", "spec": "nope"}, headers=admin)
        assert bad.status_code == 400 and "crontab" in bad.json()["error"]["message"]
        assert httpx.post(server.url + "/admin/jobs", json={"kind": "interval", "spec": "5"}).status_code == 401
        made = httpx.post(server.url + "/admin/jobs", json={"kind": "feedback", "spec": "40", "algo": "kto"},
                          headers=admin)
        assert made.status_code == 201
        out = server.cli("jobs", "add", "--cron", "30 2 * * *", "--algo", "dpo")
        assert out.returncode == 0, out.stderr
        assert httpx.delete(server.url + "/admin/jobs/777", headers=admin).status_code == 404
        run = httpx.post(server.url + f"/admin/jobs/{made.json()['id']}/run", headers=admin)
        assert run.status_code == 202  # the cycle starts (and is refused for lack of feedback)
    finally:
        stop_server(server)
    listed = server.cli("jobs", "list")  # no service: read from the store
    assert "feedback" in listed.stdout and "30 2 * * *" in listed.stdout, listed.stdout + listed.stderr
    server = start_server(data, str(tiny_model_dir))
    try:
        jobs = httpx.get(server.url + "/admin/jobs", headers=admin).json()["jobs"]
        assert {(j["kind"], j["spec"], j["algo"]) for j in jobs} == {("feedback", "40", "kto"),
                                                                    ("cron", "30 2 * * *", "dpo")}
        cron = next(j for j in jobs if j["kind"] == "cron")
        assert cron["next_run"] and cron["next_run"].endswith("02:30:00+00:00")
        out = server.cli("jobs", "remove", str(cron["id"]))
        assert out.returncode == 0, out.stderr
        assert len(httpx.get(server.url + "/admin/jobs", headers=admin).json()["jobs"]) == 1
    finally:
        stop_server(server)


def test_missed_runs_are_coalesced_into_one(store):
    fake = FakeRetrainer()
    sched = RetrainScheduler(Settings(), fake, store).start(paused=True)
    try:
        job = sched.add("interval", "1", "dpo")
        # while the scheduler is paused (as when the service was down), three runs fall due
        end = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=3.2)
        sched.scheduler.get_job(f"schedule-{job['id']}").reschedule(IntervalTrigger(seconds=1, end_date=end))
        time.sleep(3.5)
        sched.scheduler.resume()
        assert fake.fired.wait(10)
        time.sleep(1.0)  # uncoalesced, the other missed runs would land now (and no later ones exist)
        assert fake.calls == [("dpo", f"interval:schedule-{job['id']}")]
    finally:
        sched.shutdown()
