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
from datetime import datetime
from typing import Any, TypeVar

import msgspec

from infra.config import ClickHouseConfig
from streams.archive import ARCHIVE_COLUMNS, ARCHIVE_TABLE, ArchiveRow

log = logging.getLogger(__name__)
T = TypeVar("T")


class StoreError(RuntimeError):
    """The ClickHouse store could not be opened or used."""


# Each migration is a list of idempotent statements; `{db}` is the database.
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
]


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


class AsyncStore:
    """The store for async code: every call runs on the store's one thread."""

    def __init__(self, store: ClickHouseStore) -> None:
        self.store = store
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clickhouse")

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def write_archive(self, rows: Sequence[ArchiveRow]) -> None:
        await self._run(self.store.insert_archive, rows)

    async def stream_events(self, tenant_id: str, stream_id: str) -> list[ArchivedEvent]:
        return await self._run(self.store.stream_events, tenant_id, stream_id)

    async def search(
        self, where: EventFilter, limit: int | None = None, page_size: int = 2000
    ) -> AsyncIterator[list[ArchivedEvent]]:
        """Matching events page by page (memory stays one page, whatever the total)."""
        after: tuple[datetime, str] | None = None
        remaining = limit
        while remaining is None or remaining > 0:
            size = page_size if remaining is None else min(page_size, remaining)
            page = await self._run(self.store.search_page, where, after, size)
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
