"""The feedback routes: a thumb on a reply (``/v1/feedback``) and an A/B choice between two
(``/v1/comparisons``).

Invariants: the vote is the caller's (``chatloop.web.deps.caller``) and only on replies that
were shown to them (403 otherwise); a refused vote writes nothing.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from chatloop.service import Service
from chatloop.web.deps import admitted, service_of
from chatloop.web.protocol import ComparisonRequest, FeedbackRequest

router = APIRouter(prefix="/v1")


@router.post("/feedback")
def feedback(body: FeedbackRequest, request: Request, service: Service = Depends(service_of)):
    who = admitted(request, body.user, "feedback")
    fid = service.feedback(body.message_id, body.rating, who.user_id, body.reason, body.comment)
    return {"id": fid, "message_id": body.message_id, "rating": body.rating}


@router.post("/comparisons")
def comparisons(body: ComparisonRequest, request: Request, service: Service = Depends(service_of)):
    who = admitted(request, body.user, "feedback")
    cid = service.compare(body.message_a, body.message_b, body.choice, who.user_id)
    return {"id": cid, "choice": body.choice}
