"""One context: its state, transcript, documents, tags, overrides, feedback, its state at a
moment, and its audit trail."""

import base64
import binascii
from datetime import datetime
from typing import Annotated, Any

import msgspec
from fastapi import Depends, FastAPI, HTTPException, Query
from fastapi.responses import HTMLResponse, JSONResponse

from actors.context import ContextCommand
from events import FeedbackGiven
from infra.http.deps import Api
from infra.http.errors import OpenAIError, as_http
from infra.http.queries import check_moments
from infra.http.schemas import (
    AUTO_MODEL,
    AuditEvent,
    Caller,
    ConfigIn,
    ContextId,
    DocumentIn,
    FeedbackIn,
    TagsIn,
)
from infra.services.history import UnknownContext, state_at
from infra.services.render import CSP, transcript_html


def add_routes(app: FastAPI, api: Api) -> None:
    """Add the routes to the app, bound to the API's collaborators."""

    @app.get("/v1/contexts/{context_id}")
    async def get_context(
        context_id: ContextId, who: Annotated[Caller, Depends(api.caller)]
    ) -> dict[str, Any]:
        """The context's state: tags, overrides, documents (without their bytes), counts."""
        try:
            result = await api.gateway.view(api.meta_for(who, context_id, None, None))
        except Exception as exc:
            raise as_http(exc) from None
        view: dict[str, Any] = msgspec.to_builtins(result)
        return view

    @app.get("/v1/contexts/{context_id}/transcript", response_class=HTMLResponse)
    async def transcript(
        context_id: ContextId, who: Annotated[Caller, Depends(api.caller)]
    ) -> HTMLResponse:
        """The conversation as an HTML page: every message shown as text, never as markup."""
        try:
            messages = await api.gateway.conversation(api.meta_for(who, context_id, None, None))
        except Exception as exc:
            raise as_http(exc) from None
        return HTMLResponse(
            transcript_html(context_id, messages),
            headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"},
        )

    @app.post("/v1/contexts/{context_id}/documents")
    async def attach_document(
        context_id: ContextId, body: DocumentIn, who: Annotated[Caller, Depends(api.caller)]
    ) -> dict[str, Any]:
        """Attach a document (size-limited); text documents are given to the model."""
        try:
            content = base64.b64decode(body.content_base64, validate=True)
        except (binascii.Error, ValueError):
            raise OpenAIError(
                400,
                "content_base64 is not valid base64",
                "invalid_request_error",
                "invalid_request",
            ) from None
        meta = api.meta_for(who, context_id, None, None)
        return await api.run_command(
            ContextCommand(meta=meta, attach=(body.name, body.mime_type, content))
        )

    @app.delete("/v1/contexts/{context_id}/documents/{document_id}")
    async def remove_document(
        context_id: ContextId, document_id: str, who: Annotated[Caller, Depends(api.caller)]
    ) -> dict[str, Any]:
        meta = api.meta_for(who, context_id, None, None)
        return await api.run_command(ContextCommand(meta=meta, remove_document=document_id))

    @app.put("/v1/contexts/{context_id}/tags")
    async def set_tags(
        context_id: ContextId, body: TagsIn, who: Annotated[Caller, Depends(api.caller)]
    ) -> dict[str, Any]:
        """Replace the context's tags (the event records what was added and removed)."""
        meta = api.meta_for(who, context_id, None, None)
        return await api.run_command(ContextCommand(meta=meta, set_tags=tuple(body.tags)))

    @app.patch("/v1/contexts/{context_id}/config")
    async def configure(
        context_id: ContextId, body: ConfigIn, who: Annotated[Caller, Depends(api.caller)]
    ) -> dict[str, Any]:
        """Per-context overrides: model, system_prompt. An unknown model is a 404, now, not
        a silent reroute at the next turn."""
        model = body.overrides.get("model")
        if model and model != AUTO_MODEL and model not in api.known_models():
            raise api.model_not_found(model, "overrides.model")
        meta = api.meta_for(who, context_id, None, None)
        return await api.run_command(ContextCommand(meta=meta, configure=body.overrides))

    @app.post("/v1/contexts/{context_id}/feedback")
    async def give_feedback(
        context_id: ContextId, body: FeedbackIn, who: Annotated[Caller, Depends(api.caller)]
    ) -> dict[str, Any]:
        """Thumbs up/down and/or a 1-5 rating of one reply (its message_id is in the
        `chatllm.events` of the reply, or in the context's messages)."""
        meta = api.meta_for(who, context_id, None, None)
        feedback = FeedbackGiven(
            message_id=body.message_id, thumbs=body.thumbs, rating=body.rating, reason=body.reason
        )
        return await api.run_command(ContextCommand(meta=meta, feedback=feedback))

    @app.get("/v1/contexts/{context_id}/state", response_model=None)
    async def context_state_at(
        context_id: ContextId,
        who: Annotated[Caller, Depends(api.caller)],
        at: Annotated[datetime, Query(description="the moment, ISO 8601 with a zone")],
    ) -> Any:
        """Time travel: the context (messages, documents, tags, config) and the limiter and
        router state that applied to it, exactly as they were at `at`, from events alone."""
        check_moments(at)
        await api.archived_so_far()
        try:
            moment = await state_at(api.store, who.tenant_id, context_id, at)
        except UnknownContext as exc:
            raise HTTPException(404, str(exc)) from None
        return JSONResponse(msgspec.to_builtins(moment))

    @app.get("/v1/contexts/{context_id}/events", response_model=list[AuditEvent])
    async def context_events(
        context_id: ContextId, who: Annotated[Caller, Depends(api.caller)]
    ) -> list[AuditEvent]:
        """The context's archived events in stream order (the audit trail)."""
        await api.archived_so_far()
        records = await api.store.stream_events(who.tenant_id, context_id)
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
                logged=r.body,
            )
            for r in records
        ]
