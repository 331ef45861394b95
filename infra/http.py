"""The HTTP API (FastAPI; OpenAPI at /docs and /openapi.json)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import msgspec
from fastapi import FastAPI, Header, HTTPException, Path, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from actors.context import ChatTurn, ContextRejected, SendMessage, VersionConflict
from infra.clock import SystemClock, new_trace_id, parse_traceparent
from infra.kafka import LogUnavailable
from infra.store import AsyncStore

log = logging.getLogger(__name__)

IDENT = r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$"
ContextId = Annotated[str, Path(pattern=IDENT, description="context id (letters, digits, . _ : -)")]
TenantHeader = Annotated[
    str | None,
    Header(alias="X-Tenant-Id", pattern=IDENT, description="tenant; default from config"),
]


class MessageIn(BaseModel):
    content: str = Field(min_length=1, max_length=100_000)
    user_id: str = Field(default="anonymous", pattern=IDENT)
    title: str = Field(default="", max_length=500)


class EventRef(BaseModel):
    event_id: str
    type: str
    stream_version: int


class TurnOut(BaseModel):
    context_id: str
    ok: bool
    reply: str
    model: str
    error_class: str = ""
    events: list[EventRef]


class AuditEvent(BaseModel):
    stream_version: int
    event_id: str
    type: str
    occurred_at: str
    user_id: str
    trace_id: str
    causation_id: str
    event: dict[str, Any] = Field(description="the event exactly as it is on the log")


class Health(BaseModel):
    status: str
    archived: int
    dead_lettered: int


def build_api(
    *,
    gateway: Any,
    store: AsyncStore,
    default_tenant: str,
    archive_stats: Callable[[], tuple[int, int]],
    lifespan: Callable[[], contextlib.AbstractAsyncContextManager[None]] | None = None,
) -> FastAPI:
    """The API around a gateway and a store; `lifespan` runs with the server (the Faust worker)."""

    @contextlib.asynccontextmanager
    async def _lifespan(_: FastAPI) -> AsyncIterator[None]:
        if lifespan is None:
            yield
        else:
            async with lifespan():
                yield

    api = FastAPI(title="chat-llm", version="0.1.0", lifespan=_lifespan)
    clock = SystemClock()

    @api.exception_handler(LogUnavailable)
    async def _log_down(_: Request, exc: LogUnavailable) -> JSONResponse:
        return JSONResponse({"detail": f"event log unavailable, nothing was recorded: {exc}"}, 503)

    @api.get("/healthz", response_model=Health)
    async def health() -> Health:
        written, dead = archive_stats()
        return Health(status="ok", archived=written, dead_lettered=dead)

    @api.post("/v1/contexts/{context_id}/messages", response_model=TurnOut)
    async def send_message(
        context_id: ContextId,
        body: MessageIn,
        tenant: TenantHeader = None,
        traceparent: Annotated[str | None, Header()] = None,
    ) -> TurnOut:
        """Send a message to a context (created on its first message); returns the reply."""
        command = SendMessage(
            context_id=context_id,
            tenant_id=tenant or default_tenant,
            user_id=body.user_id,
            content=body.content,
            title=body.title,
            trace_id=parse_traceparent(traceparent) or new_trace_id(),
            correlation_id=clock.new_event_id(),
        )
        try:
            turn: ChatTurn = await gateway.chat(command)
        except ContextRejected as exc:
            raise HTTPException(403, str(exc)) from None
        except VersionConflict as exc:
            raise HTTPException(409, f"concurrent writer on this context: {exc}") from None
        except LogUnavailable:
            raise
        except Exception as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, LogUnavailable):
                raise cause from None
            log.exception("chat turn failed")
            raise HTTPException(503, f"the context actor failed: {type(exc).__name__}") from None
        return TurnOut(
            context_id=turn.context_id,
            ok=turn.ok,
            reply=turn.reply,
            model=turn.model,
            error_class=turn.error_class,
            events=[
                EventRef(event_id=e.event_id, type=e.type, stream_version=e.stream_version)
                for e in turn.events
            ],
        )

    @api.get("/v1/contexts/{context_id}/events", response_model=list[AuditEvent])
    async def context_events(
        context_id: ContextId, tenant: TenantHeader = None
    ) -> list[AuditEvent]:
        """The context's archived events in stream order (the audit trail)."""
        records = await store.stream_events(tenant or default_tenant, context_id)
        return [
            AuditEvent(
                stream_version=r.stream_version,
                event_id=r.event_id,
                type=r.type,
                occurred_at=r.occurred_at.isoformat(),
                user_id=r.user_id,
                trace_id=r.trace_id,
                causation_id=r.causation_id,
                event=msgspec.json.decode(r.body),
            )
            for r in records
        ]

    return api
