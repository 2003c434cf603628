"""Operator routes for versions: list, activate, roll back, the live comparison, ratings and the
liked share of each served version.

Invariants: every route here needs the operator token; an unknown version in the path is 404.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends

from chatloop.service import Service
from chatloop.web.deps import require_operator, service_of
from chatloop.web.protocol import CompareRequest

router = APIRouter(prefix="/admin", dependencies=[Depends(require_operator)])


@router.get("/adapters")
def adapters(service: Service = Depends(service_of)):
    return {"active": service.active_version, "adapters": service.adapters()}


@router.post("/adapters/{version}/activate")
def activate(version: str, service: Service = Depends(service_of)):
    previous = service.activate(version, actor="operator", reason="activated by an operator")
    return {"active": version, "previous": previous}


@router.post("/rollback")
def rollback(service: Service = Depends(service_of)):
    previous, active = service.rollback()
    return {"active": active, "previous": previous}


@router.get("/ratings")
def ratings(service: Service = Depends(service_of)):
    return {"ratings": service.ratings(), "live_comparison": service.live_comparison(),
            "liked_by_version": service.liked_by_version()}


@router.post("/compare")
def live_compare(body: CompareRequest, service: Service = Depends(service_of)):
    service.set_live_comparison(body.version)
    return {"live_comparison": service.live_comparison()}
