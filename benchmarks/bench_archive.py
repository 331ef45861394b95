"""The archive processor end to end (Kafka → Faust → chDB) against inserting the same rows
straight into chDB in the same batch size: how much the stream processing costs on top."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from aiokafka import AIOKafkaProducer
from faust.contrib.asgi import faust_app_running

from benchmarks.common import Result
from events import encode
from infra.broker import EmbeddedBroker
from infra.config import ClickHouseConfig
from infra.kafka import ensure_topics
from infra.store import AsyncStore, ClickHouseStore
from streams.app import ProjectionWorker, WorkerSettings
from streams.archive import archive_row
from tests.factories import make_event


async def _measure(
    bootstrap: str, store: ClickHouseStore, datadir: Path, n: int, batch: int
) -> tuple[float, float]:
    events = [make_event(f"ctx-{i % 200}", i // 200 + 1, n=i + 1) for i in range(n)]
    await ensure_topics(bootstrap, ["bench-events", "bench-dlq"], partitions=4)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    pending = [
        await producer.send("bench-events", key=e.stream_id.encode(), value=encode(e))
        for e in events
    ]
    await asyncio.gather(*pending)
    await producer.stop()

    astore = AsyncStore(store)
    worker = ProjectionWorker(
        WorkerSettings(
            bootstrap_servers=bootstrap,
            datadir=datadir,
            events_topic="bench-events",
            deadletter_topic="bench-dlq",
            batch_size=batch,
            session_timeout_s=3.0,
            heartbeat_interval_s=0.5,
            rebalance_timeout_s=1.0,
        ),
        astore,
    )
    async with faust_app_running(worker.app, stop_timeout=30):
        # Time from the first archived row, so the group join is not counted.
        while worker.written == 0:
            await asyncio.sleep(0.001)
        started, first = time.perf_counter(), worker.written
        while worker.written < n:
            await asyncio.sleep(0.001)
        pipeline = (n - first) / (time.perf_counter() - started)

    store.client.command(f"TRUNCATE TABLE {store.db}.events")
    rows = [
        archive_row(e, encode(e), topic="t", partition=0, offset=i) for i, e in enumerate(events)
    ]
    started = time.perf_counter()
    for i in range(0, n, batch):
        await astore.write_archive(rows[i : i + batch])
    direct = n / (time.perf_counter() - started)
    astore.close()
    return pipeline, direct


def run(n: int = 30_000, batch: int = 1000) -> list[Result]:
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker() as broker:
        store = ClickHouseStore(
            ClickHouseConfig(path=str(Path(tmp) / "chdb"), database="bench")
        ).open()
        store.migrate()
        try:
            pipeline, direct = asyncio.run(
                _measure(broker.bootstrap_servers, store, Path(tmp) / "faust", n, batch)
            )
        finally:
            store.close()
    return [
        Result(
            f"archive: Kafka → Faust → chDB ({batch}/batch)",
            "events/s",
            pipeline,
            "decoded rows inserted directly",
            direct,
        )
    ]
