"""The request log: the tenant's archived events, filtered, as JSON, JSON lines or CSV."""

import csv
import io
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from fastapi import Depends, FastAPI, Query
from fastapi.responses import JSONResponse, StreamingResponse

from infra.adapters.clickhouse.reads import ArchivedEvent, EventFilter
from infra.adapters.clickhouse.store import AsyncStore
from infra.http.deps import Api
from infra.http.errors import OpenAIError
from infra.http.queries import QueryError, check_moments
from infra.http.schemas import Caller


def add_routes(app: FastAPI, api: Api) -> None:
    """Add the routes to the app, bound to the API's collaborators."""

    @app.get("/v1/events", response_model=None)
    async def search_events(
        who: Annotated[Caller, Depends(api.caller)],
        type_: Annotated[list[str] | None, Query(alias="type", description="event types")] = None,
        since: Annotated[datetime | None, Query(description="from (inclusive), ISO 8601")] = None,
        until: Annotated[datetime | None, Query(description="to (exclusive), ISO 8601")] = None,
        user: Annotated[str, Query(max_length=256)] = "",
        context: Annotated[str, Query(max_length=256)] = "",
        model: Annotated[str, Query(max_length=256)] = "",
        q: Annotated[str, Query(max_length=1000, description="text anywhere in the event")] = "",
        format_: Annotated[Literal["json", "jsonl", "csv"], Query(alias="format")] = "json",
        limit: Annotated[int | None, Query(ge=1, le=10_000_000)] = None,
    ) -> Any:
        """The request log: the caller's tenant's archived events, filtered, in time order.
        `json` answers up to `limit` (default 100) events; `jsonl` (the events exactly as
        logged) and `csv` stream any number with flat memory."""
        try:
            check_moments(since, until)
        except QueryError as exc:
            raise OpenAIError(400, str(exc), "invalid_request_error", "invalid_query") from None
        where = EventFilter(
            tenant_id=who.tenant_id,
            types=tuple(type_ or ()),
            since=since,
            until=until,
            user_id=user,
            context_id=context,
            model=model,
            text=q,
        )
        await api.archived_so_far()
        if format_ == "json":
            found = [
                {**_logged(e), "event": msgspec.json.decode(e.body)}
                async for page in api.store.search(where, limit or 100)
                for e in page
            ]
            return JSONResponse(found)
        media = "application/x-ndjson" if format_ == "jsonl" else "text/csv"
        return StreamingResponse(_export(api.store, where, limit, format_), media_type=media)


CSV_COLUMNS = (
    "occurred_at",
    "type",
    "stream_id",
    "stream_version",
    "user_id",
    "event_id",
    "trace_id",
)


def _logged(event: ArchivedEvent) -> dict[str, Any]:
    return {
        "occurred_at": event.occurred_at.isoformat(),
        "type": event.type,
        "stream_id": event.stream_id,
        "stream_version": event.stream_version,
        "user_id": event.user_id,
        "event_id": event.event_id,
        "trace_id": event.trace_id,
    }


async def _export(
    store: AsyncStore, where: EventFilter, limit: int | None, format_: str
) -> AsyncIterator[bytes]:
    """Page by page: the response never holds more than one page of the archive."""
    if format_ == "csv":
        yield (",".join(CSV_COLUMNS) + "\r\n").encode()
    async for page in store.search(where, limit):
        if format_ == "jsonl":
            yield b"".join(e.body.encode() + b"\n" for e in page)
        else:
            buffer = io.StringIO()
            writer = csv.writer(buffer)
            for event in page:
                row = _logged(event)
                writer.writerow([row[c] for c in CSV_COLUMNS])
            yield buffer.getvalue().encode()
