"""The projection worker (Kafka → worker → chDB: archive + facts) against what it stands
on, measured in the same run:

- sustained throughput against inserting the same rows straight into the same chDB in the
  same batch size (target: at least half the raw insert rate);
- p99 projection lag (event time to rows written) at a fixed offered load of 5,000
  events/s (target: under 1 s);
- an analytics query over 10 million archived events (target: under 200 ms).
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
from aiokafka import AIOKafkaProducer
from rich.progress import Progress

from benchmarks.common import Result
from events import decode, encode
from infra.adapters.clickhouse.store import AsyncStore, ClickHouseStore
from infra.adapters.kafka.broker import EmbeddedBroker
from infra.adapters.kafka.clients import ensure_topics
from infra.config import ClickHouseConfig
from streams.app import ProjectionWorker, WorkerSettings
from streams.archive import archive_row
from streams.ports import ProjectionBatch
from streams.projections import project, table_of
from tests.factories import make_turn


def _traffic(n_events: int, start: int = 0) -> list[Any]:
    events: list[Any] = []
    versions: dict[str, int] = {}
    n = start
    while len(events) < n_events:
        n += 1
        context = f"ctx-{n % 400}"
        turn = make_turn(n, context=context, version=versions.get(context, 1))
        versions[context] = versions.get(context, 1) + len(turn)
        events += turn
    return events[:n_events]


def _worker(bootstrap: str, astore: AsyncStore, batch: int, topic: str, **kw: Any) -> Any:
    return ProjectionWorker(
        WorkerSettings(
            bootstrap_servers=bootstrap,
            events_topic=topic,
            deadletter_topic="bench-dlq",
            app_id=f"bench-{time.monotonic_ns()}",
            batch_size=batch,
            session_timeout_s=3.0,
            heartbeat_interval_s=0.5,
            rebalance_timeout_s=1.0,
        ),
        astore,
        **kw,
    )


async def _throughput(
    bootstrap: str, store: ClickHouseStore, n: int, batch: int
) -> tuple[float, float]:
    events = _traffic(n)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    pending = [
        await producer.send("bench-events", key=e.stream_id.encode(), value=encode(e))
        for e in events
    ]
    await asyncio.gather(*pending)
    await producer.stop()

    astore = AsyncStore(store)
    worker = _worker(bootstrap, astore, batch, "bench-events")
    async with worker.running():
        # Time from the first written batch, so the group join is not counted.
        while worker.written == 0:
            await asyncio.sleep(0.001)
        started, first = time.perf_counter(), worker.written
        while worker.written < n:
            await asyncio.sleep(0.001)
        pipeline = (n - first) / (time.perf_counter() - started)

    # The same rows, decoded and projected already, straight into fresh tables.
    for table in ("events", "facts"):
        store.client.command(f"TRUNCATE TABLE {store.db}.{table}")
    batches = []
    for i in range(0, n, batch):
        out = ProjectionBatch()
        for e in events[i : i + batch]:
            out.archive.append(archive_row(e, encode(e), topic="t", partition=0, offset=0))
            row = project(e)
            if row is not None:
                out.rows.setdefault(table_of(row), []).append(row)
        batches.append(out)
    started = time.perf_counter()
    for out in batches:
        await astore.write(out)
    direct = n / (time.perf_counter() - started)
    astore.close()
    return pipeline, direct


async def _raw_lags(bootstrap: str, topic: str, lags: list[float]) -> None:
    """A plain consumer of `topic` (its own group): each event's lag from its stamp to its
    arrival, decoded as the worker decodes it. The baseline of the worker's lag."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id="bench-raw",
                                auto_offset_reset="latest", fetch_max_wait_ms=50)  # fmt: skip
    await consumer.start()
    try:
        while True:
            batches = await consumer.getmany(timeout_ms=100)
            now = datetime.now(UTC)
            for records in batches.values():
                lags.extend((now - decode(r.value).occurred_at).total_seconds() for r in records)
    finally:
        await consumer.stop()


async def _lag_at(
    bootstrap: str, store: ClickHouseStore, rate: int, seconds: float, batch: int
) -> tuple[list[float], list[float]]:
    """Offer `rate` events/s for `seconds` (each stamped when sent); the worker's lags, and
    a raw consumer's on the same topic at the same time."""
    astore = AsyncStore(store)
    lags: list[float] = []
    raw: list[float] = []
    raw_task = asyncio.create_task(_raw_lags(bootstrap, "bench-lag", raw))
    worker = _worker(
        bootstrap,
        astore,
        batch,
        "bench-lag",
        observe_lag=lambda processors, batch: lags.extend(batch),
    )
    template = _traffic(int(rate * seconds), start=10_000_000)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        async with worker.running():
            # Warm up: the group join and the first fetches are not part of the steady state.
            await asyncio.sleep(4)
            lags.clear()
            raw.clear()
            per_tick = max(1, int(rate * 0.01))  # sent every ~10 ms
            started = time.perf_counter()
            sent = 0
            while sent < len(template):
                now = datetime.now(UTC)
                chunk = [
                    msgspec.structs.replace(e, occurred_at=now)
                    for e in template[sent : sent + per_tick]
                ]
                for e in chunk:
                    await producer.send("bench-lag", key=e.stream_id.encode(), value=encode(e))
                sent += len(chunk)
                delay = started + sent / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            await producer.flush()
            deadline = time.monotonic() + 30
            while len(lags) < len(template) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
    finally:
        raw_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await raw_task
        await producer.stop()
        astore.close()
    return lags, raw


def _analytics_over(store: ClickHouseStore, total: int) -> tuple[float, float]:
    """Fill `facts` with `total` events of one tenant (30 days, realistic mix), then time the
    per-minute analytics over all of them; returns (best ms, raw count(*) ms)."""
    store.client.command(f"TRUNCATE TABLE {store.db}.facts")
    step = 2_000_000
    with Progress(transient=True) as progress:
        task = progress.add_task("10M facts", total=total)
        for offset in range(0, total, step):
            store.client.command(
                f"INSERT INTO {store.db}.facts (event_id, tenant_id, at, type, context_id,"
                " stream_version, conversation_id, user_id, role, model, status, error_class,"
                " latency_ms, prompt_tokens, completion_tokens, tokens)"
                " SELECT toString(generateUUIDv7()), 'bench',"
                " toDateTime64('2026-01-01 00:00:00', 6, 'UTC') + toIntervalMillisecond(n * 259),"
                # a turn's eight events; one turn in 50 ends in ReplyFailed instead of a reply
                " if(n % 8 = 1 AND intDiv(n, 8) % 50 = 0, 'ReplyFailed',"
                " ['MessageReceived','ReplyCompleted','RateLimitChecked','ModelCalled',"
                "  'RouteDecided','SentimentScored','InputChecked','ContextCreated'][n % 8 + 1]),"
                " concat('ctx-', toString(intDiv(n, 8) % 5000)), intDiv(n, 8) + 1,"
                " concat('turn-', toString(intDiv(n, 8))), 'u1', 'user',"
                " ['demo-fast','demo-1','demo-large'][n % 3 + 1],"
                # as the projector writes them: a failed model call's status is its class
                " multiIf(n % 8 = 2 AND n % 97 = 0, 'denied', n % 8 = 3 AND n % 53 = 0,"
                " 'network', 'ok'),"
                " if(n % 8 = 3 AND n % 53 = 0, 'network', ''),"
                " (n % 1000) / 3.0, n % 50, n % 200, n % 30"
                f" FROM (SELECT number + {offset} AS n FROM numbers({min(step, total - offset)}))"
            )
            progress.advance(task, min(step, total - offset))
    store.client.command(f"OPTIMIZE TABLE {store.db}.facts FINAL")
    timings = []
    for _ in range(5):
        started = time.perf_counter()
        rows = store.analytics("bench", bucket_s=3600)
        timings.append((time.perf_counter() - started) * 1000)
    assert sum(r["requests"] for r in rows) > 0 and any(r["errors_by_class"] for r in rows)
    raw = []
    for _ in range(3):
        started = time.perf_counter()
        store.client.query(f"SELECT count() FROM {store.db}.facts WHERE tenant_id = 'bench'")
        raw.append((time.perf_counter() - started) * 1000)
    return min(timings), min(raw)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def run(
    n: int = 30_000, batch: int = 1000, rate: int = 5000, analytics_events: int = 10_000_000
) -> list[Result]:
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker() as broker:
        store = ClickHouseStore(
            ClickHouseConfig(path=str(Path(tmp) / "chdb"), database="bench")
        ).open()
        store.migrate()
        try:
            asyncio.run(
                ensure_topics(
                    broker.bootstrap_servers, ["bench-events", "bench-lag", "bench-dlq"], 4
                )
            )
            pipeline, direct = asyncio.run(_throughput(broker.bootstrap_servers, store, n, batch))
            lags, raw_lags = asyncio.run(
                _lag_at(broker.bootstrap_servers, store, rate, 10.0, batch)
            )
            query_ms, count_ms = _analytics_over(store, analytics_events)
        finally:
            store.close()
    return [
        Result(
            f"projections: Kafka → projection worker → chDB ({batch}/batch)",
            "events/s",
            pipeline,
            "same rows inserted directly",
            direct,
            note="target ratio >= 0.5 (archive at least half the raw insert rate)",
        ),
        Result(
            f"projection lag p99 at {rate:,} events/s offered",
            "s",
            _pct(lags, 0.99),
            "a raw consumer's lag p99 on the same topic",
            _pct(raw_lags, 0.99),
            higher_is_better=False,
            note=f"p50 {_pct(lags, 0.5):.3f} s, max {max(lags, default=float('nan')):.3f} s,"
            f" {len(lags)} events",
            target=1.0,
        ),
        Result(
            f"analytics query over {analytics_events / 1e6:.0f}M events (chDB)",
            "ms",
            query_ms,
            "count(*) over the same rows",
            count_ms,
            higher_is_better=False,
            note="per-hour rollups of one tenant, FINAL",
            target=200.0,
        ),
    ]
