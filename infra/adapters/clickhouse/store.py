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
from functools import partial
from typing import Any, TypeVar

import msgspec

from events import decode, encode
from events.chain import payload_digest
from events.erasure import erase
from infra.adapters.clickhouse.migrations import migrate
from infra.adapters.clickhouse.reads import (
    ArchivedEvent,
    EventFilter,
    StoreReads,
    as_utc,
)
from infra.adapters.clickhouse.sql import (
    COLUMNS,
    MEMORY_TYPES_SQL,
)
from infra.config import ClickHouseConfig
from streams.archive import ARCHIVE_COLUMNS, ARCHIVE_TABLE, ArchiveRow
from streams.ports import ProjectionBatch
from streams.projections import (
    FACT_COLUMNS,
    FACTS_TABLE,
    PRUNES_TABLE,
    Row,
    is_pruned,
    redact,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


class StoreError(RuntimeError):
    """The ClickHouse store could not be opened or used."""


class ClickHouseStore(StoreReads):
    """Blocking store operations; use AsyncStore from async code. The writes live here, the
    reads in StoreReads, the schema in migrations. Long as a class: one short method per
    write (append, projections, forget, prune), in the order the worker calls them."""

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
        return migrate(self.client, self.db)

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
                into or kind, list(rows), column_names=list(COLUMNS[kind]), database=self.db
            )

    def insert_encoded(self, kind: str, data: bytes, into: str | None = None) -> None:
        """Insert rows of table `kind` already encoded as JSON arrays, one per line, in the
        table's column order (see streams.projections); ClickHouse parses them itself."""
        if data:
            self.client.raw_insert(
                f"{self.db}.{into or kind}",
                column_names=list(COLUMNS[kind]),
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
            f"tenant_id = {{tenant:String}} AND type IN ({MEMORY_TYPES_SQL})"
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
            f" WHERE type IN ({MEMORY_TYPES_SQL}) AND at < {{before:DateTime64(6, 'UTC')}}"
            " AND redacted = 0 GROUP BY tenant_id",
            parameters={"before": before},
        ).result_rows
        return {str(t): int(n) for t, n in rows}

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
        counts: dict[str, int] = await self.call_with(lambda s: s.prune_counts(before))
        return counts

    async def call_with(self, fn: Callable[[ClickHouseStore], T]) -> T:
        """Run `fn(store)` on the store's thread."""
        return await self._run(fn, self.store)

    async def stream_events(self, tenant_id: str, stream_id: str) -> list[ArchivedEvent]:
        found: list[ArchivedEvent] = await self.call_with(
            lambda s: s.stream_events(tenant_id, stream_id)
        )
        return found

    async def search(
        self, where: EventFilter, limit: int | None = None, page_size: int = 2000
    ) -> AsyncIterator[list[ArchivedEvent]]:
        """Matching events page by page (memory stays one page, whatever the total)."""
        after: tuple[datetime, str] | None = None
        remaining = limit
        while remaining is None or remaining > 0:
            size = page_size if remaining is None else min(page_size, remaining)
            page = await self.call_with(partial(_search_page, where=where, after=after, size=size))
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


def _search_page(
    store: ClickHouseStore,
    where: EventFilter,
    after: tuple[datetime, str] | None,
    size: int,
) -> list[ArchivedEvent]:
    return store.search_page(where, after, size)
