"""The store's reads: the typed queries of the read side (memory, analytics, quality,
workflows, anomalies), the audit chain and the request log. ClickHouseStore inherits them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec

from infra.adapters.clickhouse.sql import (
    COLUMNS,
    MEMORY_COLUMNS,
    MEMORY_FIELDS,
    MEMORY_SELECT,
    ROW_TYPES,
)
from streams.archive import ARCHIVE_TABLE
from streams.projections import (
    ANOMALIES_TABLE,
    ANOMALY_COLUMNS,
    FACTS_TABLE,
    Row,
)


def _ok_ms(aggregate: str) -> str:
    """`aggregate` over the latency of completed steps, in ms, 0 when there are none."""
    return f"round(ifNotFinite({aggregate}(latency_ms, status = 'completed'), 0), 3)"


class ArchivedEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One archived event as the audit trail and the request log show it."""

    occurred_at: datetime
    event_id: str
    type: str
    stream_id: str
    stream_version: int
    user_id: str
    trace_id: str
    causation_id: str
    body: str


_EVENT_COLUMNS = ", ".join(ArchivedEvent.__struct_fields__)

# The columns of what the read methods answer (a CSV with no rows still has its header).
ANALYTICS_ROW = ("bucket", "requests", "replies", "latency_p50_ms", "latency_p95_ms",
                 "latency_p99_ms", "tokens", "errors", "errors_by_class", "models", "fallbacks",
                 "denials", "blocked", "circuit_openings", "sentiment")  # fmt: skip
MEMORY_ROW = (*MEMORY_COLUMNS, "tags")
QUALITY_ROW = ("model", "topic", "feedback", "up", "down", "avg_rating", "satisfied")


def utc_aware(value: Any) -> Any:
    """chDB hands back naive datetimes; every column is UTC: say so (other values pass)."""
    return as_utc(value) if isinstance(value, datetime) else value


def _archived(rows: Sequence[Sequence[Any]]) -> list[ArchivedEvent]:
    fields = ArchivedEvent.__struct_fields__
    return [
        ArchivedEvent(**{f: utc_aware(v) for f, v in zip(fields, r, strict=True)}) for r in rows
    ]


class EventFilter(msgspec.Struct, frozen=True, kw_only=True):
    """A search over one tenant's archived events; every field narrows it."""

    tenant_id: str
    types: tuple[str, ...] = ()
    since: datetime | None = None
    until: datetime | None = None
    user_id: str = ""
    context_id: str = ""
    model: str = ""
    text: str = ""


def as_utc(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def time_range(
    since: datetime | None, until: datetime | None, column: str
) -> tuple[list[str], dict[str, Any]]:
    """WHERE clauses (and their parameters) for `since <= column < until`."""
    clauses: list[str] = []
    params: dict[str, Any] = {}
    if since is not None:
        clauses.append(f"{column} >= {{since:DateTime64(6, 'UTC')}}")
        params["since"] = since
    if until is not None:
        clauses.append(f"{column} < {{until:DateTime64(6, 'UTC')}}")
        params["until"] = until
    return clauses, params


def _scope(
    tenant_id: str, since: datetime | None, until: datetime | None, *, column: str
) -> tuple[str, dict[str, Any]]:
    """The WHERE clause every read-side query starts with: the caller's tenant, a time range."""
    clauses, params = time_range(since, until, column)
    return " AND ".join(["tenant_id = {tenant:String}", *clauses]), {"tenant": tenant_id, **params}


class StoreReads(ABC):
    """The read queries; ClickHouseStore provides `client` and `db`. One class of small
    queries (the longest, analytics, is one SELECT and its shaping)."""

    db: str

    @property
    @abstractmethod
    def client(self) -> Any:
        """The open clickhouse-connect client (ClickHouseStore's)."""

    def _dicts(self, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        result = self.client.query(sql, parameters=params)
        names = result.column_names
        return [
            {n: utc_aware(v) for n, v in zip(names, row, strict=True)} for row in result.result_rows
        ]

    def memory(
        self,
        tenant_id: str,
        *,
        context_id: str = "",
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        """Conversations of the tenant, newest first, with tags, sentiment and token usage."""
        where, params = _scope(tenant_id, since, until, column="at")
        if context_id:
            where += " AND context_id = {context:String}"
            params["context"] = context_id
        inner = MEMORY_SELECT.format(db=self.db, where=where)
        sql = (
            f"SELECT {MEMORY_FIELDS}, t.tags AS tags FROM ({inner}) AS m"
            f" LEFT JOIN (SELECT * FROM {self.db}.memory_cutoffs"
            " WHERE tenant_id = {tenant:String}) AS c ON c.tenant_id = m.tenant_id"
            f" LEFT JOIN (SELECT * FROM {self.db}.context_tags"
            " WHERE tenant_id = {tenant:String}) AS t"
            " ON t.tenant_id = m.tenant_id AND t.context_id = m.context_id"
            " WHERE m.started_at >= c.cutoff"
            " ORDER BY m.started_at DESC, m.conversation_id"
            " LIMIT {limit:UInt32} OFFSET {offset:UInt32}"
        )
        params.update(limit=limit, offset=offset)
        return self._dicts(sql, params)

    def memory_stats(
        self, tenant_id: str, since: datetime | None = None, until: datetime | None = None
    ) -> dict[str, Any]:
        """{total, by_context, avg_duration_ms, sentiment_breakdown, tokens} of the memory."""
        where, params = _scope(tenant_id, since, until, column="at")
        inner = MEMORY_SELECT.format(db=self.db, where=where)
        memory = (
            f"SELECT m.* FROM ({inner}) AS m"
            f" LEFT JOIN (SELECT * FROM {self.db}.memory_cutoffs"
            " WHERE tenant_id = {tenant:String}) AS c ON c.tenant_id = m.tenant_id"
            " WHERE m.started_at >= c.cutoff"
        )
        totals = self._dicts(
            "SELECT count() AS total, avg(duration_ms) AS avg_duration_ms,"
            " sum(message_tokens) AS message_tokens, sum(prompt_tokens) AS prompt_tokens,"
            " sum(completion_tokens) AS completion_tokens,"
            " min(started_at) AS first_at, max(ended_at) AS last_at"
            f" FROM ({memory})",
            params,
        )[0]
        by_context = self._dicts(
            f"SELECT context_id, count() AS conversations FROM ({memory})"
            " GROUP BY context_id ORDER BY conversations DESC, context_id LIMIT 100",
            params,
        )
        sentiment = self._dicts(
            f"SELECT if(sentiment_label = '', 'unscored', sentiment_label) AS label,"
            f" count() AS conversations FROM ({memory}) GROUP BY label ORDER BY label",
            params,
        )
        total = int(totals["total"])
        tokens = int(totals["prompt_tokens"]) + int(totals["completion_tokens"])
        span_days = 0.0
        if total and totals["first_at"] is not None:
            span_days = max((totals["last_at"] - totals["first_at"]).total_seconds(), 1) / 86400
        return {
            "total": total,
            "by_context": {r["context_id"]: int(r["conversations"]) for r in by_context},
            "avg_duration_ms": float(totals["avg_duration_ms"]) if total else 0.0,
            "sentiment_breakdown": {r["label"]: int(r["conversations"]) for r in sentiment},
            "tokens": {
                "prompt": int(totals["prompt_tokens"]),
                "completion": int(totals["completion_tokens"]),
                "total": tokens,
                "per_conversation": round(tokens / total, 1) if total else 0.0,
                # An estimate: the rate seen so far, extrapolated to a day.
                "estimated_per_day": round(tokens / span_days) if span_days else 0,
            },
        }

    def analytics(
        self,
        tenant_id: str,
        since: datetime | None = None,
        until: datetime | None = None,
        bucket_s: int = 60,
    ) -> list[dict[str, Any]]:
        """Rollups per bucket (a minute by default): requests, latency percentiles, tokens,
        errors by class, model usage, fallbacks, denials, blocks, circuit openings, and the
        sentiment of the messages received (positive, neutral, negative)."""
        where, params = _scope(tenant_id, since, until, column="at")
        bucket = (
            "toStartOfMinute(at)"
            if bucket_s == 60
            else f"toStartOfInterval(at, INTERVAL {int(bucket_s)} SECOND)"
        )
        # Two narrow queries instead of one wide one: the facts are ordered by (tenant,
        # type, status, at), so each reads only the rows it counts (over 10M events: ~3x
        # faster than one pass over every row).
        facts = f"{self.db}.{FACTS_TABLE} FINAL"
        replies = self._dicts(
            f"SELECT {bucket} AS bucket, count() AS replies,"
            " quantiles(0.5, 0.95, 0.99)(latency_ms) AS latency,"
            " sum(prompt_tokens + completion_tokens) AS tokens,"
            " countIf(fallback = 1) AS fallbacks, sumMap(map(model, toUInt64(1))) AS models"
            f" FROM {facts} WHERE {where} AND type = 'ReplyCompleted' GROUP BY bucket",
            params,
        )
        exceptions = self._dicts(
            f"SELECT {bucket} AS bucket, type, status, error_class, count() AS n FROM {facts}"
            f" WHERE {where} AND (type = 'ReplyFailed'"
            " OR (type = 'RateLimitChecked' AND status = 'denied')"
            " OR (type = 'InputChecked' AND status = 'block')"
            " OR (type = 'CircuitChanged' AND status = 'open')"
            " OR (type = 'ModelCalled' AND status != 'ok'))"
            " GROUP BY bucket, type, status, error_class",
            params,
        )
        moods = self._dicts(
            f"SELECT {bucket} AS bucket, sentiment_label AS label, count() AS n FROM {facts}"
            f" WHERE {where} AND type = 'SentimentScored' GROUP BY bucket, label",
            params,
        )
        out: dict[datetime, dict[str, Any]] = {}

        def row(at: datetime) -> dict[str, Any]:
            if at not in out:
                out[at] = {
                    "bucket": at,
                    "requests": 0,
                    "replies": 0,
                    "latency_p50_ms": None,
                    "latency_p95_ms": None,
                    "latency_p99_ms": None,
                    "tokens": 0,
                    "errors": 0,
                    "errors_by_class": {},
                    "models": {},
                    "fallbacks": 0,
                    "denials": 0,
                    "blocked": 0,
                    "circuit_openings": 0,
                    "sentiment": {"positive": 0, "neutral": 0, "negative": 0},
                }
            return out[at]

        for r in replies:
            b = row(r["bucket"])
            p50, p95, p99 = (round(float(v), 3) for v in r["latency"])
            b.update(
                replies=int(r["replies"]),
                latency_p50_ms=p50,
                latency_p95_ms=p95,
                latency_p99_ms=p99,
                tokens=int(r["tokens"]),
                fallbacks=int(r["fallbacks"]),
                models={str(k): int(v) for k, v in sorted(r["models"].items())},
            )
            b["requests"] += int(r["replies"])
        counted = {
            "ReplyFailed": "errors",
            "RateLimitChecked": "denials",
            "InputChecked": "blocked",
        }
        for r in exceptions:
            b, n = row(r["bucket"]), int(r["n"])
            if r["type"] == "ModelCalled":
                by_class = b["errors_by_class"]
                by_class[str(r["error_class"])] = by_class.get(str(r["error_class"]), 0) + n
            elif r["type"] == "CircuitChanged":
                b["circuit_openings"] += n
            else:
                b[counted[r["type"]]] += n
                b["requests"] += n
        for r in moods:
            sentiment = row(r["bucket"])["sentiment"]
            sentiment[str(r["label"])] = sentiment.get(str(r["label"]), 0) + int(r["n"])
        for b in out.values():
            b["errors_by_class"] = dict(sorted(b["errors_by_class"].items()))
        return [out[at] for at in sorted(out)]

    def conversation_analytics(
        self, tenant_id: str, since: datetime | None = None, until: datetime | None = None
    ) -> dict[str, Any]:
        """Average response time, satisfaction from feedback, topics, kinds of follow-up."""
        where, params = _scope(tenant_id, since, until, column="at")
        facts = f"{self.db}.{FACTS_TABLE} FINAL"
        head = self._dicts(
            "SELECT avgIf(latency_ms, type = 'ReplyCompleted') AS avg_response_ms,"
            " countIf(type = 'ReplyCompleted') AS replies,"
            " countIf(type = 'FeedbackGiven') AS feedback,"
            # Satisfaction in 0..1: a rating r counts (r - 1) / 4, thumbs up 1, down 0.
            " avgIf(if(rating > 0, (rating - 1) / 4, if(thumbs = 'up', 1, 0)),"
            " type = 'FeedbackGiven' AND (rating > 0 OR thumbs != '')) AS satisfaction,"
            " countIf(type = 'FeedbackGiven' AND thumbs = 'up') AS thumbs_up,"
            " countIf(type = 'FeedbackGiven' AND thumbs = 'down') AS thumbs_down"
            f" FROM {facts} WHERE {where}",
            params,
        )[0]
        topics = self._dicts(
            f"SELECT topic, count() AS messages FROM {facts} WHERE {where}"
            " AND type = 'MessageReceived' AND role = 'user' AND topic != ''"
            " GROUP BY topic ORDER BY messages DESC, topic",
            params,
        )
        # A follow-up is any user message of a context after its first one.
        follow_ups = self._dicts(
            "SELECT follow_up AS kind, count() AS messages FROM ("
            " SELECT follow_up, stream_version,"
            " min(stream_version) OVER (PARTITION BY context_id) AS first_version"
            f" FROM {facts} WHERE {where} AND type = 'MessageReceived' AND role = 'user'"
            ") WHERE stream_version > first_version"
            " GROUP BY kind ORDER BY messages DESC, kind",
            params,
        )
        replies = int(head["replies"])
        feedback = int(head["feedback"])
        return {
            "avg_response_ms": round(float(head["avg_response_ms"]), 3) if replies else None,
            "replies": replies,
            "feedback": feedback,
            "satisfaction": round(float(head["satisfaction"]), 4) if feedback else None,
            "thumbs_up": int(head["thumbs_up"]),
            "thumbs_down": int(head["thumbs_down"]),
            "topics": {r["topic"]: int(r["messages"]) for r in topics},
            "follow_ups": {r["kind"]: int(r["messages"]) for r in follow_ups},
        }

    def quality(
        self, tenant_id: str, since: datetime | None = None, until: datetime | None = None
    ) -> list[dict[str, Any]]:
        """Feedback per model and topic: how many, thumbs up and down, the mean rating, and
        the satisfied share (up or 4-5 counts 1, down or 1-2 counts 0, a 3 counts half)."""
        clauses = ["tenant_id = {tenant:String}", "type = 'FeedbackGiven'", "model != ''"]
        params: dict[str, Any] = {"tenant": tenant_id}
        if since is not None:
            clauses.append("at >= {since:DateTime64(6, 'UTC')}")
            params["since"] = since
        if until is not None:
            clauses.append("at < {until:DateTime64(6, 'UTC')}")
            params["until"] = until
        satisfied = (
            "multiIf(rating >= 4, 1, rating between 1 and 2, 0, rating = 3, 0.5,"
            " thumbs = 'up', 1, 0)"
        )
        return self._dicts(
            "SELECT model, topic, count() AS feedback, countIf(thumbs = 'up') AS up,"
            " countIf(thumbs = 'down') AS down,"
            " round(ifNotFinite(avgIf(rating, rating > 0), 0), 3) AS avg_rating,"
            f" round(avg({satisfied}), 4) AS satisfied"
            f" FROM {self.db}.{FACTS_TABLE} FINAL WHERE {' AND '.join(clauses)}"
            " GROUP BY model, topic ORDER BY model, topic",
            params,
        )

    def workflow_runs(
        self, tenant_id: str, workflow: str = "", limit: int = 50
    ) -> list[dict[str, Any]]:
        """The newest runs (of one workflow, or all), with their status and step counts."""
        where = " AND workflow = {workflow:String}" if workflow else ""
        return self._dicts(
            "SELECT substring(context_id, 10) AS run_id, any(workflow) AS workflow,"
            " minIf(at, type = 'WorkflowStarted') AS started_at,"
            " if(countIf(type = 'WorkflowFinished') > 0,"
            "    anyIf(status, type = 'WorkflowFinished'), 'running') AS status,"
            " maxIf(latency_ms, type = 'WorkflowFinished') AS duration_ms,"
            " countIf(type = 'WorkflowStepCompleted') AS steps_completed,"
            " countIf(type = 'WorkflowStepFailed') AS steps_failed"
            f" FROM {self.db}.{FACTS_TABLE} FINAL"
            " WHERE tenant_id = {tenant:String} AND startsWith(context_id, 'workflow:')"
            f"{where} GROUP BY context_id"
            " HAVING countIf(type = 'WorkflowStarted') > 0"
            " ORDER BY started_at DESC LIMIT {limit:UInt32}"
            # The `workflow` of WHERE is the column, not the any(workflow) alias.
            " SETTINGS prefer_column_name_to_alias = 1",
            {"tenant": tenant_id, "workflow": workflow, "limit": limit},
        )

    def workflow_metrics(self, tenant_id: str, workflow: str = "") -> list[dict[str, Any]]:
        """Per workflow and step: how often it completed, failed and was skipped, and its
        duration (avg, p50, p95 over completed runs of the step), from the facts."""
        where = " AND workflow = {workflow:String}" if workflow else ""
        return self._dicts(
            "SELECT workflow, step,"
            " countIf(status = 'completed') AS completed, countIf(status = 'failed') AS failed,"
            " countIf(status = 'skipped') AS skipped,"
            f" {_ok_ms('avgIf')} AS avg_ms,"
            f" {_ok_ms('quantileExactIf(0.5)')} AS p50_ms,"
            f" {_ok_ms('quantileExactIf(0.95)')} AS p95_ms"
            f" FROM {self.db}.{FACTS_TABLE} FINAL"
            " WHERE tenant_id = {tenant:String}"
            " AND type IN ('WorkflowStepCompleted', 'WorkflowStepFailed', 'WorkflowStepSkipped')"
            f"{where} GROUP BY workflow, step ORDER BY workflow, step",
            {"tenant": tenant_id, "workflow": workflow},
        )

    def anomalies(
        self,
        tenant_id: str,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """The tenant's anomalies, newest first."""
        where, params = _scope(tenant_id, since, until, column="at")
        params["limit"] = limit
        return self._dicts(
            f"SELECT {', '.join(ANOMALY_COLUMNS)} FROM {self.db}.{ANOMALIES_TABLE} FINAL"
            f" WHERE {where} ORDER BY at DESC, event_id LIMIT {{limit:UInt32}}",
            params,
        )

    def table_rows(self, table: str) -> list[tuple[Any, ...]]:
        """Every row of a projection table, deduplicated, in event_id order (for checks)."""
        columns = COLUMNS[table]
        return [
            tuple(r)
            for r in self.client.query(
                f"SELECT {', '.join(columns)} FROM {self.db}.{table} FINAL ORDER BY event_id"
            ).result_rows
        ]

    def projected_rows(self, table: str) -> list[Row]:
        """table_rows as the projector's row types (UTC datetimes, tuples): comparable with
        streams.projections.fold."""
        kind = ROW_TYPES[table]
        return [
            kind(
                *(
                    as_utc(v) if isinstance(v, datetime) else tuple(v) if isinstance(v, list) else v
                    for v in values
                )
            )
            for values in self.table_rows(table)
        ]

    def chain_page(
        self, tenant_id: str, stream_id: str, after: tuple[str, int] | None, limit: int
    ) -> list[tuple[str, int, str, str]]:
        """(stream_id, version, body, erased_digest) of the tenant's archived events in
        (stream, version) order after `after`; one stream only when `stream_id` is set."""
        clauses = ["tenant_id = {tenant:String}"]
        params: dict[str, Any] = {"tenant": tenant_id, "limit": limit}
        if stream_id:
            clauses.append("stream_id = {stream:String}")
            params["stream"] = stream_id
        if after is not None:
            clauses.append("(stream_id, stream_version) > ({s:String}, {v:UInt64})")
            params["s"], params["v"] = after
        rows = self.client.query(
            f"SELECT stream_id, stream_version, body, erased_digest"
            f" FROM {self.db}.{ARCHIVE_TABLE} FINAL WHERE {' AND '.join(clauses)}"
            # Log order within a version: where two events claim it, the first logged
            # is the one kept unless the chain says otherwise (events/chain.py on_chain).
            " ORDER BY stream_id, stream_version, partition, offset LIMIT {limit:UInt32}",
            parameters=params,
        ).result_rows
        return [(str(s), int(v), str(b), str(d)) for s, v, b, d in rows]

    def stream_events(self, tenant_id: str, stream_id: str) -> list[ArchivedEvent]:
        """A stream's archived events in stream order, each once (FINAL dedups by event_id)."""
        result = self.client.query(
            f"SELECT {_EVENT_COLUMNS} FROM {self.db}.{ARCHIVE_TABLE} FINAL"
            " WHERE tenant_id = {tenant:String} AND stream_id = {stream:String}"
            " ORDER BY stream_version, event_id",
            parameters={"tenant": tenant_id, "stream": stream_id},
        )
        return _archived(result.result_rows)

    def key_events(self, topic: str) -> tuple[list[str], int | None]:
        """Every archived API-key event of `topic` (streams `keys:*`, every tenant) in log
        order, and the offset of the last of them (they share one partition; None if none)."""
        result = self.client.query(
            f"SELECT body, `offset` FROM {self.db}.{ARCHIVE_TABLE} FINAL"
            " WHERE topic = {topic:String} AND stream_id LIKE 'keys:%' ORDER BY `offset`",
            parameters={"topic": topic},
        )
        rows = result.result_rows
        return [r[0] for r in rows], (int(rows[-1][1]) if rows else None)

    def search_page(
        self, where: EventFilter, after: tuple[datetime, str] | None, limit: int
    ) -> list[ArchivedEvent]:
        """One page of matching events in time order, after the (occurred_at, event_id) key
        of the previous page: a keyset page, so an export of any size holds one page."""
        clauses = ["tenant_id = {tenant:String}"]
        params: dict[str, Any] = {"tenant": where.tenant_id, "limit": limit}
        if where.types:
            clauses.append("type IN {types:Array(String)}")
            params["types"] = list(where.types)
        if where.since is not None:
            clauses.append("occurred_at >= {since:DateTime64(6, 'UTC')}")
            params["since"] = where.since
        if where.until is not None:
            clauses.append("occurred_at < {until:DateTime64(6, 'UTC')}")
            params["until"] = where.until
        if where.user_id:
            clauses.append("user_id = {user:String}")
            params["user"] = where.user_id
        if where.context_id:
            clauses.append("stream_id = {context:String}")
            params["context"] = where.context_id
        if where.model:
            clauses.append("JSONExtractString(body, 'payload', 'model') = {model:String}")
            params["model"] = where.model
        if where.text:
            clauses.append("positionCaseInsensitiveUTF8(body, {text:String}) > 0")
            params["text"] = where.text
        if after is not None:
            clauses.append(
                "(occurred_at, event_id) > ({after_at:DateTime64(6, 'UTC')}, {after_id:String})"
            )
            params["after_at"], params["after_id"] = after
        result = self.client.query(
            f"SELECT {_EVENT_COLUMNS} FROM {self.db}.{ARCHIVE_TABLE} FINAL"
            f" WHERE {' AND '.join(clauses)} ORDER BY occurred_at, event_id LIMIT {{limit:UInt32}}",
            parameters=params,
        )
        return _archived(result.result_rows)

    def archive_counts(self) -> tuple[int, int]:
        """(rows, distinct event ids) in the archive, before deduplication; for checks."""
        rows = self.client.query(
            f"SELECT count(), uniqExact(event_id) FROM {self.db}.{ARCHIVE_TABLE}"
        ).result_rows
        return int(rows[0][0]), int(rows[0][1])
