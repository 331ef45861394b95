"""Upstream events in, and the dead letters of what was refused."""

from typing import Annotated, Any

import msgspec
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from infra.http.deps import Api
from infra.http.errors import OpenAIError
from infra.http.queries import QueryError
from infra.http.schemas import Caller
from infra.services.ingest import Ingest


def add_routes(app: FastAPI, api: Api) -> None:
    """Add the routes to the app, bound to the API's collaborators."""

    def ingesting() -> Ingest:
        if api.ingest is None:
            raise HTTPException(503, "ingest is not configured in this process")
        return api.ingest

    @app.post("/v1/events", tags=["ingest"])
    async def ingest_events(raw: Request, who: Annotated[Caller, Depends(api.caller)]) -> Any:
        """Ingest upstream events (the JSON envelope of docs/events.schema.json): a JSON array,
        or JSON lines (application/x-ndjson). Each is checked now; valid ones are queued on
        the ingest topic and appended to the log by the projection worker, the others go to
        the dead-letter topic and are listed in `rejected` with the reason. An event_id sent
        twice is stored once. 422 when none is valid."""
        body = await raw.body()
        # Each event's own bytes, untouched: a rejected one is dead-lettered as it was sent.
        items: list[bytes]
        if "ndjson" in raw.headers.get("content-type", ""):
            items = [line.strip() for line in body.splitlines() if line.strip()]
        else:
            try:
                items = [bytes(r) for r in msgspec.json.decode(body, type=list[msgspec.Raw])]
            except msgspec.DecodeError as exc:
                raise QueryError(
                    f"the body must be a JSON array of events (or JSON lines): {exc}"
                ) from None
        if len(items) > api.settings.ingest.max_batch:
            raise QueryError(
                f"{len(items)} events in one batch; the limit is {api.settings.ingest.max_batch}"
            )
        limit = api.settings.broker.max_record_bytes
        oversized = [i for i, item in enumerate(items) if len(item) > limit]
        if oversized:
            # Never a 503: retrying cannot make it fit. Nothing of the batch was taken.
            raise OpenAIError(
                413,
                f"event {oversized[0]} is {len(items[oversized[0]])} bytes; the log accepts at"
                f" most {limit} bytes per event (broker.max_record_bytes); nothing was accepted",
                "invalid_request_error",
                "event_too_large",
            )
        result = await ingesting().submit(items, who.tenant_id)
        status = 422 if items and not result.accepted else 200
        return JSONResponse(msgspec.to_builtins(result), status)

    @app.get("/v1/deadletters", tags=["ingest"])
    async def dead_letters(who: Annotated[Caller, Depends(api.caller)]) -> Any:
        """The dead-letter topic: records that failed validation, with the reason, naming
        the caller's tenant (and, without required API keys, those naming none)."""
        found = await ingesting().list(
            who.tenant_id, include_unowned=not api.settings.auth.required
        )
        return JSONResponse(msgspec.to_builtins(found))

    @app.post("/v1/deadletters/{partition}/{offset}/retry", tags=["ingest"])
    async def retry_dead_letter(
        partition: int, offset: int, who: Annotated[Caller, Depends(api.caller)]
    ) -> Any:
        """Re-drive one dead letter through ingest (after fixing what it depended on)."""
        try:
            result = await ingesting().retry(
                who.tenant_id, partition, offset, include_unowned=not api.settings.auth.required
            )
        except LookupError as exc:
            raise HTTPException(404, str(exc)) from None
        return JSONResponse(msgspec.to_builtins(result), 422 if not result.accepted else 200)
