"""The caller's own conversations: ``GET /v1/conversations``, ``GET`` and ``DELETE
/v1/conversations/{id}``.

Invariants: the caller is decided as for chat (``chatloop.web.deps.caller``; ``?user=`` names an
unkeyed API user as ``user`` does in a chat body); another user's conversation is 403, an unknown
or deleted one 404; deleting only marks it (it stays in the log and never trains again).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request

from chatloop.service import Service
from chatloop.web.deps import admitted, service_of

router = APIRouter(prefix="/v1/conversations")


@router.get("")
def list_conversations(request: Request, user: str | None = None, limit: int = Query(100, ge=1, le=1000),
                       service: Service = Depends(service_of)):
    who = admitted(request, user, "chat")
    return {"object": "list", "data": service.conversations(who.user_id, limit=limit)}


@router.get("/{conversation_id}")
def get_conversation(conversation_id: str, request: Request, user: str | None = None,
                     service: Service = Depends(service_of)):
    who = admitted(request, user, "chat")
    return {"id": conversation_id, "messages": service.conversation(conversation_id, who.user_id)}


@router.delete("/{conversation_id}")
def delete_conversation(conversation_id: str, request: Request, user: str | None = None,
                        service: Service = Depends(service_of)):
    who = admitted(request, user, "chat")
    service.delete_conversation(conversation_id, who.user_id)
    return {"id": conversation_id, "deleted": True}
