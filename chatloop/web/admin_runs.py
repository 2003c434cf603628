"""Operator routes for retraining: status, start and cancel a cycle, runs, overrides, schedules.

Invariants: every route here needs the operator token (the router's dependency); one cycle runs
at a time (a second start is 409); a schedule route without a scheduler in this process is 503.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from chatloop.service import Service
from chatloop.web.deps import require_operator, service_of
from chatloop.web.errors import ApiError
from chatloop.web.protocol import OverrideRequest, RetrainRequest, ScheduleRequest

router = APIRouter(prefix="/admin", dependencies=[Depends(require_operator)])


@router.get("/status")
def status(service: Service = Depends(service_of)):
    return service.status()


@router.post("/retrain", status_code=202)
def retrain(body: RetrainRequest | None = None, service: Service = Depends(service_of)):
    body = body or RetrainRequest()
    if body.wait:
        return service.retrain(body.algo, trigger="api", wait=True)
    return {"run_id": service.retrain(body.algo, trigger="api"), "status": "running"}


@router.post("/cancel")
def cancel(service: Service = Depends(service_of)):
    return {"cancelled": service.cancel_retraining()}


@router.get("/runs")
def runs(limit: int = 50, service: Service = Depends(service_of)):
    return {"runs": service.runs(limit)}


@router.get("/runs/{run_id}")
def run(run_id: int, service: Service = Depends(service_of)):
    return service.run(run_id)


@router.post("/runs/{run_id}/override")
def override(run_id: int, body: OverrideRequest, service: Service = Depends(service_of)):
    previous = service.override(run_id, body.reason)
    r = service.run(run_id)
    return {"active": r["candidate_version"], "previous": previous, "run": r["id"], "status": r["status"]}


def scheduler(request: Request) -> Any:
    """The process's ``jobs.scheduler.RetrainScheduler`` (503 without one). Called in the route,
    not as a dependency, so that a bad body is still a 400 in a process without one."""
    schedules = request.app.state.schedules
    if schedules is None:
        raise ApiError(503, "this process runs no scheduler", "unavailable")
    return schedules


@router.get("/jobs")
def jobs(request: Request):
    return {"jobs": scheduler(request).list()}


@router.post("/jobs", status_code=201)
def add_job(body: ScheduleRequest, request: Request):
    return scheduler(request).add(body.kind, body.spec, body.algo, created_by="api")


@router.delete("/jobs/{schedule_id}")
def remove_job(schedule_id: int, request: Request):
    scheduler(request).remove(schedule_id)
    return {"removed": schedule_id}


@router.post("/jobs/{schedule_id}/run", status_code=202)
def run_job(schedule_id: int, request: Request):
    return {"run_id": scheduler(request).run_now(schedule_id), "status": "running"}
