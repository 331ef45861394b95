"""The query side over HTTP: conversation memory, analytics, anomalies, live numbers, and
the dashboard. Every query is scoped to the caller's tenant (the API key's, or
X-Tenant-Id where keys are not required).

In the embedded default the API process owns chDB, so it serves these; with a
ClickHouse server any number of API replicas can.
"""

import csv
import io
import json
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from infra.adapters.clickhouse.reads import ANALYTICS_ROW, MEMORY_ROW, QUALITY_ROW, as_utc
from infra.adapters.clickhouse.store import AsyncStore
from infra.adapters.clickhouse.tenant_sql import MAX_ROWS, SqlRefused, tenant_sql
from infra.adapters.metrics import Metrics
from infra.services.render import dashboard_html
from streams.projections import ANOMALY_COLUMNS

Format = Literal["json", "csv"]
TenantPruner = Callable[[str, float | None, str], Awaitable[dict[str, int]]]
"""(tenant, max_age_days or None for the configured age, requested_by) -> {tenant: entries}."""


class QueryError(ValueError):
    """A query parameter is invalid (a 400)."""


EARLIEST, LATEST = datetime(1900, 1, 1, tzinfo=UTC), datetime(2299, 12, 31, tzinfo=UTC)
"""What ClickHouse's DateTime64 holds: a moment outside is a bad request, not a 500."""


def check_moments(*moments: datetime | None) -> None:
    """QueryError (400) for a moment without a zone, or outside what the store holds."""
    for moment in moments:
        if moment is None:
            continue
        if moment.tzinfo is None:
            raise QueryError("times need a time zone (e.g. 2026-01-01T00:00:00Z)")
        if not EARLIEST <= moment <= LATEST:
            raise QueryError(f"{moment.isoformat()} is outside 1900-01-01 .. 2299-12-31")


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return as_utc(value).isoformat()
    if isinstance(value, float) and value != value:
        return None
    return value


def rows_as(rows: list[dict[str, Any]], format_: Format, columns: Sequence[str]) -> Response:
    """A list of rows as JSON, or as CSV (maps and lists as JSON text in their cell) with its
    header row even when there are no rows."""
    plain = [{k: _plain(v) for k, v in row.items()} for row in rows]
    if format_ == "json":
        return JSONResponse(plain)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(plain[0]) if plain else list(columns))
    writer.writeheader()
    if plain:
        for row in plain:
            writer.writerow(
                {
                    k: json.dumps(v) if isinstance(v, dict | list | tuple) else v
                    for k, v in row.items()
                }
            )
    return Response(out.getvalue(), media_type="text/csv")


class SqlIn(BaseModel):
    query: str = Field(min_length=1, max_length=20_000, description="one SELECT")
    limit: int = Field(1000, ge=1, le=MAX_ROWS, description="rows at most")


class PruneIn(BaseModel):
    max_age_days: float | None = Field(
        None, gt=0, description="prune memory older than this (default: memory.max_age_days)"
    )


Since = Annotated[datetime | None, Query(description="from (inclusive), ISO 8601 with zone")]
Until = Annotated[datetime | None, Query(description="to (exclusive), ISO 8601 with zone")]


def add_query_routes(
    api: FastAPI,
    caller: Callable[..., Awaitable[Any]],
    store: AsyncStore,
    *,
    metrics: Metrics | None,
    live_counts: Callable[[], Awaitable[dict[str, int]]] | None,
    prune: TenantPruner | None,
    lag_summary: Callable[[], Awaitable[dict[str, Any]]] | None = None,
) -> None:
    Who = Annotated[Any, Depends(caller)]

    @api.get("/v1/memory", response_model=None, tags=["query"])
    async def memory(
        who: Who,
        since: Since = None,
        until: Until = None,
        context: Annotated[str, Query(max_length=256)] = "",
        limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
        offset: Annotated[int, Query(ge=0)] = 0,
        format_: Annotated[Format, Query(alias="format")] = "json",
    ) -> Response:
        """Conversation memory: one row per conversation (a request and its reply), newest
        first, with tags, sentiment, duration and token usage."""
        check_moments(since, until)
        rows = await store.call_with(
            lambda s: s.memory(
                who.tenant_id,
                context_id=context,
                since=since,
                until=until,
                limit=limit,
                offset=offset,
            )
        )
        return rows_as(rows, format_, MEMORY_ROW)

    @api.get("/v1/memory/stats", tags=["query"])
    async def memory_stats(who: Who, since: Since = None, until: Until = None) -> Any:
        """{total, by_context, avg_duration_ms, sentiment_breakdown, tokens} of the memory."""
        check_moments(since, until)
        return _plain_tree(
            await store.call_with(lambda s: s.memory_stats(who.tenant_id, since, until))
        )

    @api.post("/v1/memory/prune", tags=["query"])
    async def prune_memory(who: Who, body: PruneIn | None = None) -> Any:
        """Prune the caller's tenant's memory older than the age: a MemoryPruned event is
        appended, and the projection redacts those conversations (numbers are kept)."""
        if prune is None:
            raise QueryError("pruning runs in the process that owns the projection worker")
        age = body.max_age_days if body is not None else None
        return {"pruned": await prune(who.tenant_id, age, f"api:{who.user_id or 'anonymous'}")}

    @api.get("/v1/analytics", response_model=None, tags=["query"])
    async def analytics(
        who: Who,
        since: Since = None,
        until: Until = None,
        bucket_s: Annotated[int, Query(ge=1, le=86_400, description="bucket width")] = 60,
        format_: Annotated[Format, Query(alias="format")] = "json",
    ) -> Response:
        """Rollups per bucket (a minute by default): requests, latency p50/p95/p99, tokens,
        errors by class, model usage, fallbacks, rate-limit denials, circuit openings, and the
        sentiment of the messages received (positive, neutral, negative counts)."""
        check_moments(since, until)
        rows = await store.call_with(lambda s: s.analytics(who.tenant_id, since, until, bucket_s))
        return rows_as(rows, format_, ANALYTICS_ROW)

    @api.get("/v1/analytics/conversations", tags=["query"])
    async def conversation_analytics(who: Who, since: Since = None, until: Until = None) -> Any:
        """Average response time, satisfaction from feedback (0..1), topic distribution and
        the most frequent kinds of follow-up."""
        check_moments(since, until)
        return await store.call_with(
            lambda s: s.conversation_analytics(who.tenant_id, since, until)
        )

    @api.get("/v1/analytics/quality", response_model=None, tags=["query"])
    async def quality(
        who: Who,
        since: Since = None,
        until: Until = None,
        format_: Annotated[Format, Query(alias="format")] = "json",
    ) -> Response:
        """Reply quality from feedback, per model and topic: count, thumbs, mean rating and
        the satisfied share (what learned routing optimises)."""
        check_moments(since, until)
        rows = await store.call_with(lambda s: s.quality(who.tenant_id, since, until))
        return rows_as(rows, format_, QUALITY_ROW)

    @api.get("/v1/anomalies", response_model=None, tags=["query"])
    async def anomalies(
        who: Who,
        since: Since = None,
        until: Until = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
        format_: Annotated[Format, Query(alias="format")] = "json",
    ) -> Response:
        """What the detectors found, newest first, with the threshold and observed value."""
        check_moments(since, until)
        rows = await store.call_with(lambda s: s.anomalies(who.tenant_id, since, until, limit))
        return rows_as(rows, format_, ANOMALY_COLUMNS)

    @api.post("/v1/sql", tags=["query"])
    async def sql(who: Who, body: SqlIn) -> Any:
        """Your own SELECT over the store, read-only and scoped to the caller's tenant: the
        tables as the docs name them (`chatllm.events`, `chatllm.facts`, `chatllm.anomalies`,
        `chatllm.memory_prunes`) hold the tenant's rows only. No table functions, no
        SETTINGS; 20 s and `limit` rows at most. Answers {columns, rows, truncated}."""
        try:
            found = await store.call_with(
                lambda s: tenant_sql(s, who.tenant_id, body.query, body.limit)
            )
        except SqlRefused as exc:  # Ray re-raises it as itself, with the original inside
            raise QueryError(str(getattr(exc, "cause", None) or exc)) from None
        return {**found, "rows": [[_plain(v) for v in row] for row in found["rows"]]}

    @api.get("/v1/live", tags=["query"])
    async def live(who: Who) -> Any:
        """This process's live numbers for the dashboard: projection lag per processor over
        the last minute, and the projection worker's counters."""
        if lag_summary is not None:
            lag = await lag_summary()
        else:
            lag = metrics.lag_summary() if metrics is not None else {}
        return {"lag": lag, **(await live_counts() if live_counts is not None else {})}

    @api.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
    async def dashboard() -> HTMLResponse:
        """Live throughput, latency, errors, anomalies, model usage and projection lag."""
        html, csp = dashboard_html()
        return HTMLResponse(html, headers={"Content-Security-Policy": csp})


def _plain_tree(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain_tree(v) for k, v in value.items()}
    return _plain(value)
