"""Rebuild projections from the archive: into shadow tables, then swapped in atomically.

The archive (ClickHouse `events`) holds every event, also beyond the broker's retention.
A rebuild re-runs the pure projector over the archived events of a time range into
`<table>__rebuild`, keeps the rows outside the range, applies the memory prunes, swaps
the tables (EXCHANGE TABLES: atomic), then projects whatever the archive received while it
ran into the new table, and drops the old one. The live worker keeps writing meanwhile
(its own connection); the sinks dedup by event_id, so nothing is counted twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import msgspec

from events import DecodeError, decode
from infra.adapters.clickhouse.reads import as_utc, time_range
from infra.adapters.clickhouse.rebuilds import (
    SHADOW,
    archive_arrived_since,
    archive_count,
    archive_pages,
    shadow_create,
    shadow_drop,
    shadow_swap,
)
from infra.adapters.clickhouse.store import ClickHouseStore
from infra.adapters.kafka.clients import new_consumer
from streams.projections import (
    ANOMALIES_TABLE,
    FACTS_TABLE,
    PRUNES_TABLE,
    PruneRow,
    Row,
    project,
    table_of,
)

PROJECTIONS = {"facts": FACTS_TABLE, "anomalies": ANOMALIES_TABLE, "prunes": PRUNES_TABLE}
"""Name (as the CLI takes it) -> table."""
PAGE = 50_000
POOL_FROM = 100_000
"""Rebuilds of at least this many events decode and project in worker processes."""
CATCH_UP_MARGIN = timedelta(seconds=1)
"""Rows the archive committed before the rebuild began are all seen by its scan."""

Progress = Callable[[int, int], None]
"""(events done, events in all)."""


class RebuildError(RuntimeError):
    """The rebuild could not be done; the live tables are untouched."""


@dataclass
class RebuildReport:
    projections: list[str]
    since: datetime | None
    until: datetime | None
    events: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    skipped: int = 0
    """Archived bodies that no longer decode (they are counted, never silently dropped)."""
    caught_up: int = 0
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


def _range(since: datetime | None, until: datetime | None, column: str) -> tuple[str, Any]:
    clauses, params = time_range(since, until, column)
    return " AND ".join(["1", *clauses]), params


def rebuild(
    store: ClickHouseStore,
    projections: Sequence[str],
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    progress: Progress | None = None,
    workers: int = 2,
    source: Literal["archive", "broker"] = "archive",
    broker: BrokerSource | None = None,
) -> RebuildReport:
    """Rebuild the named projections (see PROJECTIONS); blocking. The events come from the
    archive (all history), or from the broker's log (what its retention still holds)."""
    if source == "broker" and broker is None:
        raise RebuildError("a rebuild from the broker needs its address and topic")
    unknown = sorted(set(projections) - set(PROJECTIONS))
    if unknown or not projections:
        raise RebuildError(f"unknown projections {unknown}; choose from {sorted(PROJECTIONS)}")
    tables = [PROJECTIONS[p] for p in projections]
    report = RebuildReport(list(projections), since, until)
    started = time.perf_counter()
    started_at = datetime.now(UTC)
    partial = since is not None or until is not None
    for table in tables:
        # A partial rebuild keeps what lies outside the range as it is.
        shadow_create(store, table, _range(since, until, "at") if partial else None)
    where, params = _range(since, until, "occurred_at")
    total = archive_count(store, where, params)
    shadow = {t: f"{t}{SHADOW}" for t in tables}
    cutoffs = dict(store.memory_cutoffs())
    if source == "broker":
        assert broker is not None
        pages = broker.pages(since, until)
    else:
        pages = archive_pages(store, where, params, PAGE)
    with _projecting(total, workers, since, until) as project_page:
        # Pages are read, decoded and projected (in worker processes for large rebuilds),
        # and inserted in a pipeline: the next pages are in flight while one is inserted.
        for projected in project_page(pages):
            _insert(store, shadow, projected, cutoffs, report)
            report.events += projected.events
            if progress is not None:
                progress(report.events, max(total, report.events))
    if source == "broker" and report.events < total:
        # The log starts after the archive (retention, or a broker that lost it): swapping
        # these tables in would silently drop the older rows.
        for table in tables:
            shadow_drop(store, table)
        raise RebuildError(
            f"the broker's log holds {report.events} events in this range, the archive"
            f" {total}: a rebuild from the broker would drop the older rows. Rebuild from"
            " the archive (--source archive), which keeps all history."
        )
    if FACTS_TABLE in tables:
        for tenant, cutoff in cutoffs.items():
            store.redact_memory(tenant, cutoff, table=shadow[FACTS_TABLE])
    for table in tables:
        shadow_swap(store, table)
    # What the archive received while the rebuild ran goes into the new tables too.
    fresh = archive_arrived_since(store, where, params, started_at - CATCH_UP_MARGIN)
    _insert(store, {t: t for t in tables}, project_bodies(fresh), cutoffs, report)
    for tenant, cutoff in cutoffs.items():
        store.redact_memory(tenant, cutoff)
    report.caught_up = len(fresh)
    for table in tables:
        shadow_drop(store, table)
    report.seconds = time.perf_counter() - started
    return report


@dataclass
class Projected:
    """One page of archived events, decoded and projected (picklable: crosses processes).
    Rows travel encoded, one JSON array per line (ClickHouse's JSONCompactEachRow): the
    parent process only hands them to ClickHouse, which parses them on its own threads."""

    events: int
    encoded: dict[str, bytes]
    counts: dict[str, int]
    prunes: list[tuple[str, datetime]]
    skipped: int


_encoder = msgspec.json.Encoder()


def project_bodies(
    bodies: Sequence[str], since: datetime | None = None, until: datetime | None = None
) -> Projected:
    """Decode and project archived bodies (pure; runs in a worker process when pooled);
    events outside [since, until) are left out (the broker's log is not indexed by time)."""
    rows: dict[str, list[Row]] = {}
    skipped = 0
    for body in bodies:
        try:
            event = decode(body.encode())
        except DecodeError:
            skipped += 1
            continue
        if (since is not None and event.occurred_at < since) or (
            until is not None and event.occurred_at >= until
        ):
            continue
        row = project(event)
        if row is not None:
            rows.setdefault(table_of(row), []).append(row)
    prunes = [
        (r.tenant_id, r.before) for r in rows.get(PRUNES_TABLE, ()) if isinstance(r, PruneRow)
    ]
    return Projected(
        events=len(bodies),
        encoded={t: b"\n".join(map(_encoder.encode, found)) for t, found in rows.items()},
        counts={t: len(found) for t, found in rows.items()},
        prunes=prunes,
        skipped=skipped,
    )


@dataclass(frozen=True)
class BrokerSource:
    """The event log on the broker, read from its beginning up to its end when read."""

    bootstrap_servers: str
    topic: str

    def pages(self, since: datetime | None, until: datetime | None) -> Iterator[list[str]]:
        """The log's records, page by page (read by a thread of its own, a few pages ahead)."""
        pages: queue.Queue[list[str] | BaseException | None] = queue.Queue(maxsize=4)
        thread = threading.Thread(
            target=lambda: asyncio.run(self._read(pages)), name="rebuild-broker", daemon=True
        )
        thread.start()
        while True:
            page = pages.get()
            if page is None:
                break
            if isinstance(page, BaseException):
                raise RebuildError(f"reading the log failed: {page!r}") from page
            yield page
        thread.join()

    async def _read(self, pages: queue.Queue[list[str] | BaseException | None]) -> None:
        from aiokafka import TopicPartition

        consumer = new_consumer(
            bootstrap_servers=self.bootstrap_servers,
            enable_auto_commit=False,
            fetch_max_wait_ms=100,
            max_partition_fetch_bytes=8 * 2**20,
        )
        try:
            await consumer.start()
            found = consumer.partitions_for_topic(self.topic) or set()
            if not found:
                await consumer.topics()
                found = consumer.partitions_for_topic(self.topic) or set()
            parts = [TopicPartition(self.topic, p) for p in sorted(found)]
            consumer.assign(parts)
            await consumer.seek_to_beginning(*parts)
            page: list[str] = []
            while True:
                batch = await consumer.getmany(timeout_ms=500, max_records=PAGE)
                for records in batch.values():
                    page.extend(r.value.decode() for r in records if r.value)
                if len(page) >= PAGE or (not batch and page):
                    pages.put(page)
                    page = []
                # Done once every partition is read up to its end as the broker reports it
                # (tansu: the highwater of the last fetch; a fetch with nothing means the end).
                at_end = True
                for tp in parts:
                    end = consumer.highwater(tp)
                    at_end = at_end and end is not None and await consumer.position(tp) >= end
                if not batch or at_end:
                    break
            if page:
                pages.put(page)
            pages.put(None)
        except BaseException as exc:
            pages.put(exc)
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()


@contextlib.contextmanager
def _projecting(
    total: int, workers: int, since: datetime | None, until: datetime | None
) -> Iterator[Callable[[Iterable[list[str]]], Iterator[Projected]]]:
    """project_bodies over pages: inline for small rebuilds, else in `workers` processes
    with a few pages in flight (the parent reads and inserts meanwhile)."""
    if workers < 1 or total < POOL_FROM:
        yield lambda pages: (project_bodies(page, since, until) for page in pages)
        return
    context = multiprocessing.get_context("spawn")  # no fork of a process holding chDB
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:

        def pooled(pages: Iterable[list[str]]) -> Iterator[Projected]:
            in_flight: deque[Future[Projected]] = deque()
            for page in pages:
                in_flight.append(pool.submit(project_bodies, page, since, until))
                if len(in_flight) > workers:
                    yield in_flight.popleft().result()
            while in_flight:
                yield in_flight.popleft().result()

        yield pooled


def _insert(
    store: ClickHouseStore,
    names: dict[str, str],
    projected: Projected,
    cutoffs: dict[str, datetime],
    report: RebuildReport,
) -> None:
    """Insert a page's rows of the rebuilt tables; note the prunes it carries. (The memory
    that prunes redact is redacted after the scan, over the whole table.)"""
    report.skipped += projected.skipped
    for tenant, before in projected.prunes:
        known = cutoffs.get(tenant)
        if known is None or before > known:
            cutoffs[tenant] = as_utc(before)
    for table, data in projected.encoded.items():
        if table in names:
            store.insert_encoded(table, data, into=names[table])
            report.rows[table] = report.rows.get(table, 0) + projected.counts[table]


class RebuildJob:
    """A rebuild running in a thread of the serving process, on a connection of its own
    (the API and the projection worker keep theirs), with its progress for pollers."""

    def __init__(
        self,
        open_store: Callable[[], ClickHouseStore],
        projections: Sequence[str],
        since: datetime | None,
        until: datetime | None,
        source: Literal["archive", "broker"] = "archive",
        broker: BrokerSource | None = None,
    ) -> None:
        unknown = sorted(set(projections) - set(PROJECTIONS))
        if unknown or not projections:
            raise RebuildError(f"unknown projections {unknown}; choose from {sorted(PROJECTIONS)}")
        self.job_id = f"rebuild-{int(time.time() * 1000)}"
        self.projections = list(projections)
        self.since, self.until = since, until
        self.source, self.broker = source, broker
        self.done = 0
        self.total = 0
        self.started = time.monotonic()
        self.report: RebuildReport | None = None
        self.error = ""
        self._open_store = open_store
        self.thread = threading.Thread(target=self._run, name=self.job_id, daemon=True)

    def start(self) -> RebuildJob:
        self.thread.start()
        return self

    @property
    def state(self) -> str:
        return "failed" if self.error else "done" if self.report else "running"

    def _progress(self, done: int, total: int) -> None:
        self.done, self.total = done, total

    def _run(self) -> None:
        store = self._open_store()
        try:
            self.report = rebuild(
                store,
                self.projections,
                since=self.since,
                until=self.until,
                progress=self._progress,
                source=self.source,
                broker=self.broker,
            )
        except Exception as exc:  # reported to the poller; the live tables are untouched
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            store.close()

    def status(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self.started
        rate = self.done / elapsed if elapsed else 0.0
        left = max(self.total - self.done, 0)
        return {
            "job_id": self.job_id,
            "state": self.state,
            "projections": self.projections,
            "done": self.done,
            "total": self.total,
            "rate": round(rate, 1),
            "eta_s": round(left / rate, 1) if rate and self.state == "running" else 0.0,
            "error": self.error,
            "report": None
            if self.report is None
            else {
                "events": self.report.events,
                "rows": self.report.rows,
                "skipped": self.report.skipped,
                "caught_up": self.report.caught_up,
                "seconds": round(self.report.seconds, 3),
                "rate": round(self.report.rate, 1),
            },
        }
