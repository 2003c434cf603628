"""Operator routes for the log and for identities: the read-only SQL console, exports, imports of
public data sets, and API keys.

Invariants: every route here needs the operator token; an API key is shown once, in the answer
that created it; an import's file is written to a private temporary folder and parsed off the
event loop.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from chatloop.service import Service
from chatloop.web.deps import require_operator, service_of
from chatloop.web.errors import ApiError
from chatloop.web.protocol import KeyRequest, SqlRequest

router = APIRouter(prefix="/admin", dependencies=[Depends(require_operator)])


@router.post("/sql")
def sql(body: SqlRequest, service: Service = Depends(service_of)):
    return service.sql(body.sql, body.max_rows)


@router.get("/export")
def export(what: Literal["pairs", "feedback", "conversations"] = "feedback",
           format: Literal["jsonl", "parquet"] = "jsonl",  # noqa: A002 - the query parameter's name
           service: Service = Depends(service_of)):
    media = "application/x-ndjson" if format == "jsonl" else "application/vnd.apache.parquet"
    return Response(service.export(what, format), media_type=media,
                    headers={"Content-Disposition": f'attachment; filename="chatloop-{what}.{format}"'})


@router.post("/import/{kind}")
async def import_data(kind: Literal["oasst", "hh"], request: Request, name: str = "upload",
                      limit: int | None = None, service: Service = Depends(service_of)):
    """Replay a public data set (the file's bytes are the body) into the log: OpenAssistant
    trees (``*.jsonl``) or HH-RLHF pairs (``*.jsonl`` or ``*.jsonl.gz``)."""
    data = await request.body()
    if not data:
        raise ApiError(400, "the request body must hold the file to import")
    suffix = ".jsonl.gz" if data[:2] == b"\x1f\x8b" else ".jsonl"
    safe = "".join(ch for ch in Path(name).name if ch.isalnum() or ch in "._-")[:100] or "upload"
    with tempfile.TemporaryDirectory(prefix="chatloop-import-") as tmp:
        path = Path(tmp) / (safe.removesuffix(".gz").removesuffix(".jsonl") + suffix)
        path.write_bytes(data)
        try:  # in a worker thread: the import's writes must not stall the event loop
            return await asyncio.to_thread(service.import_file, kind, path, limit)
        except (ValueError, KeyError, TypeError, OSError) as exc:  # json, gzip and shape errors
            raise ApiError(400, f"cannot import this file as {kind}: {type(exc).__name__}: {exc}") from None


@router.get("/keys")
def list_keys(service: Service = Depends(service_of)):
    return {"keys": service.api_keys()}


@router.post("/keys", status_code=201)
def create_key(body: KeyRequest, service: Service = Depends(service_of)):
    listing, token = service.create_api_key(body.name, body.chat_per_minute, body.feedback_per_minute, body.max_pairs)
    return {**listing, "key": token}  # the only time the key is shown


@router.delete("/keys/{key_id}")
def revoke_key(key_id: str, service: Service = Depends(service_of)):
    service.revoke_api_key(key_id)
    return {"revoked": key_id}
