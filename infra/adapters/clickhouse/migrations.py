"""The store's tables, as numbered migrations applied once each (schema_migrations records
them), and the function that applies those not applied yet."""

from __future__ import annotations

import logging
from typing import Any

from infra.adapters.clickhouse.sql import (
    ANALYTICS_SELECT,
    MEMORY_FIELDS,
    MEMORY_SELECT,
)
from streams.archive import ARCHIVE_TABLE
from streams.projections import (
    ANOMALIES_TABLE,
    FACTS_TABLE,
    PRUNES_TABLE,
)

log = logging.getLogger(__name__)

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
            SELECT m.tenant_id AS tenant_id, {MEMORY_FIELDS}, t.tags AS tags
            FROM ({MEMORY_SELECT.format(db="{db}", where="1")}) AS m
            LEFT JOIN {{db}}.memory_cutoffs AS c ON c.tenant_id = m.tenant_id
            LEFT JOIN {{db}}.context_tags AS t
                ON t.tenant_id = m.tenant_id AND t.context_id = m.context_id
            WHERE m.started_at >= c.cutoff
            """,
            f"""
            CREATE OR REPLACE VIEW {{db}}.analytics_minute AS
            {ANALYTICS_SELECT.format(db="{db}", where="1", bucket="toStartOfMinute(at)")}
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


def migrate(c: Any, db: str) -> list[int]:
    """Apply the migrations not applied yet; safe to run any number of times."""
    c.command(f"CREATE DATABASE IF NOT EXISTS {db}")
    c.command(
        f"CREATE TABLE IF NOT EXISTS {db}.schema_migrations ("
        " version UInt32, name String, applied_at DateTime64(3, 'UTC') DEFAULT now64(3))"
        " ENGINE = ReplacingMergeTree ORDER BY version"
    )
    done = {row[0] for row in c.query(f"SELECT version FROM {db}.schema_migrations").result_rows}
    applied = []
    for version, name, statements in MIGRATIONS:
        if version in done:
            continue
        for statement in statements:
            c.command(statement.format(db=db))
        c.insert(
            "schema_migrations",
            [[version, name]],
            column_names=["version", "name"],
            database=db,
        )
        applied.append(version)
        log.info("applied migration %d (%s)", version, name)
    return applied
