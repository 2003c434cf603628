"""The service's one APScheduler 3.x scheduler and its retraining job.

Owns: building the scheduler from Settings (``retrain_cron``, ``retrain_interval_minutes``) and the
job function. A scheduled trigger goes through the same ``Retrainer`` as every other trigger, so
"one cycle at a time" holds: a tick that finds a cycle running is skipped with a log line.
Missed runs are coalesced into one (``coalesce=True``) and never run twice at once.
"""

from __future__ import annotations

import logging

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from chatloop.config import Settings
from chatloop.loop import CycleBusy, NotEnoughFeedback, Retrainer

log = logging.getLogger(__name__)

JOB_DEFAULTS = {"coalesce": True, "max_instances": 1, "misfire_grace_time": 3600}


def scheduled_retrain(retrainer: Retrainer, algo: str) -> None:
    try:
        run = retrainer.run_cycle(algo, trigger="schedule")
        log.info("scheduled retraining run %s: %s", run["id"], run["status"])
    except (CycleBusy, NotEnoughFeedback) as exc:
        log.info("scheduled retraining skipped: %s", exc)
    except Exception:
        log.exception("scheduled retraining failed")


def build_scheduler(settings: Settings, retrainer: Retrainer) -> BackgroundScheduler:
    """A scheduler with the retraining jobs the settings ask for (possibly none)."""
    scheduler = BackgroundScheduler(job_defaults=JOB_DEFAULTS, timezone="UTC")
    algo = settings.training.algo
    if settings.retrain_cron:
        scheduler.add_job(scheduled_retrain, CronTrigger.from_crontab(settings.retrain_cron, timezone="UTC"),
                          args=[retrainer, algo], id="retrain-cron", replace_existing=True)
    if settings.retrain_interval_minutes > 0:
        scheduler.add_job(scheduled_retrain, IntervalTrigger(minutes=settings.retrain_interval_minutes),
                          args=[retrainer, algo], id="retrain-interval", replace_existing=True)
    return scheduler
