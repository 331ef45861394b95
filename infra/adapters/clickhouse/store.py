"""The ClickHouse store on clickhouse-connect: embedded chDB at a path, or a server over HTTP.

Same client, same SQL for both. chDB allows one data path per process, so the
process that writes the projections is the one that serves queries over them.
All calls go through one thread: the client is not shared across threads and
the event loop never blocks on an insert.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, TypeVar

import msgspec

from events import decode, encode
from events.chain import payload_digest
from events.erasure import erase
from infra.config import ClickHouseConfig
from streams.archive import ARCHIVE_COLUMNS, ARCHIVE_TABLE, ArchiveRow
from streams.ports import ProjectionBatch
from streams.projections import (
    ANOMALIES_TABLE,
    ANOMALY_COLUMNS,
    FACT_COLUMNS,
    FACTS_TABLE,
    MEMORY_TYPES,
    PRUNE_COLUMNS,
    PRUNES_TABLE,
    AnomalyRow,
    FactRow,
    PruneRow,
    Row,
    is_pruned,
    redact,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


class StoreError(RuntimeError):
    """The ClickHouse store could not be opened or used."""


_MEMORY_TYPES_SQL = ", ".join(f"'{t}'" for t in MEMORY_TYPES)
MEMORY_COLUMNS = (
    "context_id",
    "conversation_id",
    "user_id",
    "started_at",
    "ended_at",
    "duration_ms",
    "question",
    "answer",
    "model",
    "status",
    "message_tokens",
    "prompt_tokens",
    "completion_tokens",
    "sentiment",
    "sentiment_label",
    "redacted",
)
_MEMORY_FIELDS = ", ".join(f"m.{c} AS {c}" for c in MEMORY_COLUMNS)

# One conversation per (context, correlation id): the question, the answer and what the
# turn cost. `{where}` narrows the facts read (a tenant, a context).
_MEMORY_SELECT = (
    "SELECT tenant_id, context_id, conversation_id,"
    " anyIf(user_id, type = 'MessageReceived') AS user_id,"
    " min(at) AS started_at, max(at) AS ended_at,"
    # Events of a turn are stamped together; the model's latency is most of its duration.
    " greatest(toFloat64(dateDiff('millisecond', min(at), max(at))),"
    " maxIf(latency_ms, type = 'ReplyCompleted')) AS duration_ms,"
    " argMaxIf(text, stream_version, type = 'MessageReceived' AND role = 'user') AS question,"
    " anyIf(text, type IN ('ReplyCompleted', 'ReplyFailed')) AS answer,"
    " anyIf(model, type IN ('ReplyCompleted', 'ReplyFailed')) AS model,"
    " multiIf(countIf(type = 'ReplyFailed') > 0, 'failed',"
    " countIf(type = 'ReplyCompleted') > 0, 'ok', 'open') AS status,"
    " sumIf(tokens, type = 'MessageReceived') AS message_tokens,"
    " sumIf(prompt_tokens, type = 'ReplyCompleted') AS prompt_tokens,"
    " sumIf(completion_tokens, type = 'ReplyCompleted') AS completion_tokens,"
    " avgIf(sentiment, type = 'SentimentScored') AS sentiment,"
    " argMaxIf(sentiment_label, stream_version, type = 'SentimentScored') AS sentiment_label,"
    " max(redacted) AS redacted"
    " FROM {db}.facts FINAL"
    f" WHERE type IN ({_MEMORY_TYPES_SQL}) AND {{where}}"
    " GROUP BY tenant_id, context_id, conversation_id"
)

# Rollups per `{bucket}` over the facts selected by `{where}`.
_ANALYTICS_SELECT = (
    "SELECT tenant_id, {bucket} AS bucket,"
    " countIf(type IN ('ReplyCompleted', 'ReplyFailed')"
    " OR (type = 'RateLimitChecked' AND status = 'denied')"
    " OR (type = 'InputChecked' AND status = 'block')) AS requests,"
    " countIf(type = 'ReplyCompleted') AS replies,"
    " quantileIf(0.5)(latency_ms, type = 'ReplyCompleted') AS latency_p50_ms,"
    " quantileIf(0.95)(latency_ms, type = 'ReplyCompleted') AS latency_p95_ms,"
    " quantileIf(0.99)(latency_ms, type = 'ReplyCompleted') AS latency_p99_ms,"
    " sumIf(prompt_tokens + completion_tokens, type = 'ReplyCompleted') AS tokens,"
    " countIf(type = 'ReplyFailed') AS errors,"
    " sumMapIf(map(error_class, toUInt64(1)), type = 'ModelCalled' AND error_class != '')"
    " AS errors_by_class,"
    " sumMapIf(map(model, toUInt64(1)), type = 'ReplyCompleted') AS models,"
    " countIf(type = 'ReplyCompleted' AND fallback = 1) AS fallbacks,"
    " countIf(type = 'RateLimitChecked' AND status = 'denied') AS denials,"
    " countIf(type = 'InputChecked' AND status = 'block') AS blocked,"
    " countIf(type = 'CircuitChanged' AND status = 'open') AS circuit_openings"
    " FROM {db}.facts FINAL WHERE {where}"
    " GROUP BY tenant_id, bucket ORDER BY tenant_id, bucket"
)

# Each migration is a list of idempotent statements; `{db}` is the database.
KB_TABLE = "kb_passages"
MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (
        1,
        "event archive",
        [
            f"""
            CREATE TABLE IF NOT EXISTS {{db}}.{ARCHIVE_TABLE} (
                event_id String,
                type LowCardinality(String),
                schema UInt16,
                occurred_at DateTime64(6, 'UTC'),
                stream_id String,
                stream_version UInt64,
                tenant_id LowCardinality(String),
                user_id String,
                trace_id String,
                span_id String,
                correlation_id String,
                causation_id String,
                body String CODEC(ZSTD(3)),
                topic LowCardinality(String),
                partition UInt32,
                offset UInt64,
                archived_at DateTime64(6, 'UTC') DEFAULT now64(6)
            )
            ENGINE = ReplacingMergeTree
            ORDER BY (tenant_id, stream_id, stream_version, event_id)
            """,
        ],
    ),
    (
        2,
        "read side: facts, anomalies, memory prunes, and the views over them",
        [
            f"""
            CREATE TABLE IF NOT EXISTS {{db}}.{FACTS_TABLE} (
                event_id String,
                tenant_id LowCardinality(String),
                at DateTime64(6, 'UTC'),
                type LowCardinality(String),
                context_id String,
                stream_version UInt64,
                conversation_id String,
                user_id String,
                role LowCardinality(String),
                model LowCardinality(String),
                deployment LowCardinality(String),
                status LowCardinality(String),
                error_class LowCardinality(String),
                latency_ms Float64,
                prompt_tokens UInt32,
                completion_tokens UInt32,
                tokens UInt32,
                sentiment Float32,
                sentiment_label LowCardinality(String),
                rating UInt8,
                thumbs LowCardinality(String),
                fallback UInt8,
                topic LowCardinality(String),
                follow_up LowCardinality(String),
                text String CODEC(ZSTD(3)),
                tags_added Array(String),
                tags_removed Array(String),
                redacted UInt8
            )
            ENGINE = ReplacingMergeTree(redacted)
            PARTITION BY toYYYYMM(at)
            ORDER BY (tenant_id, type, status, at, event_id)
            """,
            f"""
            CREATE TABLE IF NOT EXISTS {{db}}.{ANOMALIES_TABLE} (
                event_id String,
                tenant_id LowCardinality(String),
                at DateTime64(6, 'UTC'),
                detector LowCardinality(String),
                metric LowCardinality(String),
                subject String,
                observed Float64,
                threshold Float64,
                baseline Float64,
                window_s Float64,
                detail String
            )
            ENGINE = ReplacingMergeTree
            ORDER BY (tenant_id, at, event_id)
            """,
            f"""
            CREATE TABLE IF NOT EXISTS {{db}}.{PRUNES_TABLE} (
                event_id String,
                tenant_id LowCardinality(String),
                at DateTime64(6, 'UTC'),
                before DateTime64(6, 'UTC'),
                max_age_days Float64,
                entries UInt64,
                requested_by String
            )
            ENGINE = ReplacingMergeTree
            ORDER BY (tenant_id, at, event_id)
            """,
            # The current tags of each context: the last add/remove of each tag wins.
            f"""
            CREATE OR REPLACE VIEW {{db}}.context_tags AS
            SELECT tenant_id, context_id, arraySort(groupArray(tag)) AS tags
            FROM (
                SELECT tenant_id, context_id, pair.1 AS tag,
                       argMax(pair.2, (at, stream_version)) AS present
                FROM {{db}}.{FACTS_TABLE} FINAL
                ARRAY JOIN arrayConcat(
                    arrayMap(t -> (t, 1), tags_added), arrayMap(t -> (t, 0), tags_removed)
                ) AS pair
                WHERE type = 'TagsChanged'
                GROUP BY tenant_id, context_id, tag
            )
            WHERE present = 1
            GROUP BY tenant_id, context_id
            """,
            f"""
            CREATE OR REPLACE VIEW {{db}}.memory_cutoffs AS
            SELECT tenant_id, max(before) AS cutoff FROM {{db}}.{PRUNES_TABLE} FINAL
            GROUP BY tenant_id
            """,
            # One row per conversation (one request and its reply), newest memory only.
            f"""
            CREATE OR REPLACE VIEW {{db}}.conversation_memory AS
            SELECT m.tenant_id AS tenant_id, {_MEMORY_FIELDS}, t.tags AS tags
            FROM ({_MEMORY_SELECT.format(db="{db}", where="1")}) AS m
            LEFT JOIN {{db}}.memory_cutoffs AS c ON c.tenant_id = m.tenant_id
            LEFT JOIN {{db}}.context_tags AS t
                ON t.tenant_id = m.tenant_id AND t.context_id = m.context_id
            WHERE m.started_at >= c.cutoff
            """,
            f"""
            CREATE OR REPLACE VIEW {{db}}.analytics_minute AS
            {_ANALYTICS_SELECT.format(db="{db}", where="1", bucket="toStartOfMinute(at)")}
            """,
        ],
    ),
    (
        3,
        "archive: the payload digest kept for erased content (the audit chain still verifies)",
        [
            f"ALTER TABLE {{db}}.{ARCHIVE_TABLE}"
            " ADD COLUMN IF NOT EXISTS erased_digest String DEFAULT ''",
        ],
    ),
    (
        4,
        "facts: the workflow and step of workflow events (per-step metrics)",
        [
            f"ALTER TABLE {{db}}.{FACTS_TABLE}"
            " ADD COLUMN IF NOT EXISTS workflow LowCardinality(String) DEFAULT '',"
            " ADD COLUMN IF NOT EXISTS step LowCardinality(String) DEFAULT ''",
        ],
    ),
    (
        5,
        "knowledge base: passages with their embeddings and a vector index",
        [
            f"""
            CREATE TABLE IF NOT EXISTS {{db}}.{KB_TABLE} (
                tenant_id LowCardinality(String),
                source LowCardinality(String),
                document String,
                digest String,
                chunk UInt32,
                title String,
                text String CODEC(ZSTD(3)),
                embedding Array(Float32),
                ingested_at DateTime64(6, 'UTC') DEFAULT now64(6),
                -- bf16 vectors, 16 links a node, 64 candidates while building: half the
                -- build time of the defaults at the same recall@10 (benchmarks/).
                INDEX vectors embedding
                    TYPE vector_similarity('hnsw', 'cosineDistance', 384, 'bf16', 16, 64)
                    GRANULARITY 100000000
            )
            ENGINE = MergeTree
            ORDER BY (tenant_id, source, document, chunk)
            """,
        ],
    ),
]


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


def _archived(rows: Sequence[Sequence[Any]]) -> list[ArchivedEvent]:
    return [
        ArchivedEvent(**dict(zip(ArchivedEvent.__struct_fields__, r, strict=True))) for r in rows
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


class ClickHouseStore:
    """Blocking store operations; use AsyncStore from async code."""

    def __init__(self, config: ClickHouseConfig) -> None:
        self.config = config
        self.db = config.database
        self._client: Any = None
        self._cutoffs: dict[str, datetime] | None = None

    def open(self) -> ClickHouseStore:
        import clickhouse_connect

        try:
            if self.config.url:
                self._client = clickhouse_connect.get_client(dsn=self.config.url)
            else:
                self._client = clickhouse_connect.get_client(
                    interface="chdb", path=self.config.path
                )
        except Exception as exc:
            where = self.config.url or f"chDB path {self.config.path!r}"
            text = str(exc)
            if "already initialized with path" in text:
                hint = " (chDB allows one data path per process; this process uses another one)"
            elif "EmbeddedServer" in text:
                hint = (
                    " (another process has this chDB path open: if `chatllm up` is running,"
                    " query through its HTTP API, or stop it first)"
                )
            else:
                hint = ""
            raise StoreError(f"cannot open ClickHouse at {where}: {exc}{hint}") from exc
        return self

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    @property
    def client(self) -> Any:
        if self._client is None:
            raise StoreError("the store is not open")
        return self._client

    def migrate(self) -> list[int]:
        """Apply the migrations not applied yet; safe to run any number of times."""
        c = self.client
        c.command(f"CREATE DATABASE IF NOT EXISTS {self.db}")
        c.command(
            f"CREATE TABLE IF NOT EXISTS {self.db}.schema_migrations ("
            " version UInt32, name String, applied_at DateTime64(3, 'UTC') DEFAULT now64(3))"
            " ENGINE = ReplacingMergeTree ORDER BY version"
        )
        done = {
            row[0]
            for row in c.query(f"SELECT version FROM {self.db}.schema_migrations").result_rows
        }
        applied = []
        for version, name, statements in MIGRATIONS:
            if version in done:
                continue
            for statement in statements:
                c.command(statement.format(db=self.db))
            c.insert(
                "schema_migrations",
                [[version, name]],
                column_names=["version", "name"],
                database=self.db,
            )
            applied.append(version)
            log.info("applied migration %d (%s)", version, name)
        return applied

    def insert_archive(self, rows: Sequence[ArchiveRow]) -> None:
        self.client.insert(
            ARCHIVE_TABLE, list(rows), column_names=list(ARCHIVE_COLUMNS), database=self.db
        )

    def write(self, batch: ProjectionBatch) -> None:
        """Insert a batch's rows into every table, then apply its memory prunes."""
        if batch.archive:
            self.insert_archive(batch.archive)
        cutoffs = self.memory_cutoffs()
        for table, rows in batch.rows.items():
            self.insert_rows(table, rows, cutoffs)
        for tenant, cutoff in batch.prunes.items():
            self.redact_memory(tenant, cutoff)
            if tenant not in cutoffs or cutoff > cutoffs[tenant]:
                cutoffs[tenant] = cutoff

    def insert_rows(
        self,
        kind: str,
        rows: Sequence[Row],
        cutoffs: dict[str, datetime],
        into: str | None = None,
    ) -> None:
        """Insert projected rows of table `kind` (into `into`, by default that table); a
        memory row older than its tenant's prune cutoff goes in redacted (an old event
        redelivered, or replayed, after the prune)."""
        if kind == FACTS_TABLE:
            rows = [
                redact(r) if is_pruned(r, cutoffs.get(r.tenant_id)) else r  # type: ignore[arg-type]
                for r in rows
            ]
        if rows:
            self.client.insert(
                into or kind, list(rows), column_names=list(_COLUMNS[kind]), database=self.db
            )

    def insert_encoded(self, kind: str, data: bytes, into: str | None = None) -> None:
        """Insert rows of table `kind` already encoded as JSON arrays, one per line, in the
        table's column order (see streams.projections); ClickHouse parses them itself."""
        if data:
            self.client.raw_insert(
                f"{self.db}.{into or kind}",
                column_names=list(_COLUMNS[kind]),
                insert_block=data,
                fmt="JSONCompactEachRow",
                settings={"date_time_input_format": "best_effort"},
            )

    def memory_cutoffs(self) -> dict[str, datetime]:
        """Per tenant, the newest prune cutoff (read once, then kept current by write())."""
        if self._cutoffs is None:
            rows = self.client.query(
                f"SELECT tenant_id, max(before) FROM {self.db}.{PRUNES_TABLE} FINAL"
                " GROUP BY tenant_id"
            ).result_rows
            self._cutoffs = {str(t): as_utc(c) for t, c in rows}
        return self._cutoffs

    def redact_memory(self, tenant_id: str, before: datetime, table: str = FACTS_TABLE) -> int:
        """Clear the text of the tenant's memory rows older than `before`: a redacted copy of
        each row replaces it (ReplacingMergeTree keeps the highest `redacted`). Idempotent."""
        columns = ", ".join(
            # Positional: aliases named like the columns would shadow them in WHERE.
            "''" if c == "text" else "toUInt8(1)" if c == "redacted" else c
            for c in FACT_COLUMNS
        )
        params = {"tenant": tenant_id, "before": before}
        where = (
            f"tenant_id = {{tenant:String}} AND type IN ({_MEMORY_TYPES_SQL})"
            " AND at < {before:DateTime64(6, 'UTC')} AND redacted = 0"
        )
        count = self.client.query(
            f"SELECT count() FROM {self.db}.{table} FINAL WHERE {where}", parameters=params
        ).result_rows[0][0]
        if count:
            self.client.command(
                f"INSERT INTO {self.db}.{table} ({', '.join(FACT_COLUMNS)})"
                f" SELECT {columns} FROM {self.db}.{table} FINAL WHERE {where}",
                parameters=params,
            )
        return int(count)

    def prune_counts(self, before: datetime) -> dict[str, int]:
        """Per tenant, the conversations with memory older than `before` not yet pruned."""
        rows = self.client.query(
            f"SELECT tenant_id, uniqExact(conversation_id) FROM {self.db}.{FACTS_TABLE} FINAL"
            f" WHERE type IN ({_MEMORY_TYPES_SQL}) AND at < {{before:DateTime64(6, 'UTC')}}"
            " AND redacted = 0 GROUP BY tenant_id",
            parameters={"before": before},
        ).result_rows
        return {str(t): int(n) for t, n in rows}

    def _dicts(self, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        result = self.client.query(sql, parameters=params)
        names = result.column_names
        return [dict(zip(names, row, strict=True)) for row in result.result_rows]

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
        inner = _MEMORY_SELECT.format(db=self.db, where=where)
        sql = (
            f"SELECT {_MEMORY_FIELDS}, t.tags AS tags FROM ({inner}) AS m"
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
        inner = _MEMORY_SELECT.format(db=self.db, where=where)
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
        errors by class, model usage, fallbacks, denials, blocks, circuit openings."""
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
        columns = _COLUMNS[table]
        return [
            tuple(r)
            for r in self.client.query(
                f"SELECT {', '.join(columns)} FROM {self.db}.{table} FINAL ORDER BY event_id"
            ).result_rows
        ]

    def projected_rows(self, table: str) -> list[Row]:
        """table_rows as the projector's row types (UTC datetimes, tuples): comparable with
        streams.projections.fold."""
        kind = _ROW_TYPES[table]
        return [
            kind(
                *(
                    as_utc(v) if isinstance(v, datetime) else tuple(v) if isinstance(v, list) else v
                    for v in values
                )
            )
            for values in self.table_rows(table)
        ]

    def forget_user(self, tenant_id: str, user_id: str) -> int:
        """Erase the user's content from the archive and the projections (a data-protection
        request): each archived body is rewritten with its content blanked and the payload's
        digest kept beside it (so the audit chain still verifies), and the facts lose their
        text. Mutations rewrite the data parts: the content is gone from disk, not hidden.
        Returns how many archived events had content erased. Idempotent."""
        rows = self.client.query(
            f"SELECT event_id, body FROM {self.db}.{ARCHIVE_TABLE} FINAL"
            " WHERE tenant_id = {tenant:String} AND user_id = {user:String}"
            " AND erased_digest = ''",
            parameters={"tenant": tenant_id, "user": user_id},
        ).result_rows
        changes: list[tuple[str, str, str]] = []
        for event_id, body in rows:
            event = decode(body.encode())
            erased = erase(event.payload)
            if erased != event.payload:
                rewritten = encode(msgspec.structs.replace(event, payload=erased)).decode()
                changes.append((event_id, rewritten, payload_digest(event)))
        for start in range(0, len(changes), 500):
            chunk = changes[start : start + 500]
            self.client.command(
                f"ALTER TABLE {self.db}.{ARCHIVE_TABLE} UPDATE"
                " body = transform(event_id, {ids:Array(String)}, {bodies:Array(String)}, body),"
                " erased_digest = transform(event_id, {ids:Array(String)},"
                " {digests:Array(String)}, erased_digest)"
                " WHERE tenant_id = {tenant:String} AND event_id IN {ids:Array(String)}"
                " SETTINGS mutations_sync = 1",
                parameters={
                    "tenant": tenant_id,
                    "ids": [c[0] for c in chunk],
                    "bodies": [c[1] for c in chunk],
                    "digests": [c[2] for c in chunk],
                },
            )
        self.client.command(
            f"ALTER TABLE {self.db}.{FACTS_TABLE} UPDATE text = ''"
            " WHERE tenant_id = {tenant:String} AND user_id = {user:String} AND text != ''"
            " SETTINGS mutations_sync = 1",
            parameters={"tenant": tenant_id, "user": user_id},
        )
        return len(changes)

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


_ROW_TYPES: dict[str, Any] = {
    FACTS_TABLE: FactRow,
    ANOMALIES_TABLE: AnomalyRow,
    PRUNES_TABLE: PruneRow,
}
_COLUMNS: dict[str, tuple[str, ...]] = {
    FACTS_TABLE: FACT_COLUMNS,
    ANOMALIES_TABLE: ANOMALY_COLUMNS,
    PRUNES_TABLE: PRUNE_COLUMNS,
}


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


class AsyncStore:
    """The store for async code: every call runs on the store's one thread."""

    def __init__(self, store: ClickHouseStore) -> None:
        self.store = store
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clickhouse")

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def write_archive(self, rows: Sequence[ArchiveRow]) -> None:
        await self._run(self.store.insert_archive, rows)

    async def write(self, batch: ProjectionBatch) -> None:
        await self._run(self.store.write, batch)

    async def prune_counts(self, before: datetime) -> dict[str, int]:
        counts: dict[str, int] = await self.call("prune_counts", before)
        return counts

    async def call_with(self, fn: Callable[[ClickHouseStore], T]) -> T:
        """Run `fn(store)` on the store's thread."""
        return await self._run(fn, self.store)

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run one of the store's query methods (memory, analytics, ...) on its thread."""
        fn = getattr(self.store, method)
        return await self._run(lambda: fn(*args, **kwargs))

    async def stream_events(self, tenant_id: str, stream_id: str) -> list[ArchivedEvent]:
        found: list[ArchivedEvent] = await self.call("stream_events", tenant_id, stream_id)
        return found

    async def search(
        self, where: EventFilter, limit: int | None = None, page_size: int = 2000
    ) -> AsyncIterator[list[ArchivedEvent]]:
        """Matching events page by page (memory stays one page, whatever the total)."""
        after: tuple[datetime, str] | None = None
        remaining = limit
        while remaining is None or remaining > 0:
            size = page_size if remaining is None else min(page_size, remaining)
            page = await self.call("search_page", where, after, size)
            if not page:
                return
            yield page
            if remaining is not None:
                remaining -= len(page)
            if len(page) < size:
                return
            after = (page[-1].occurred_at, page[-1].event_id)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
