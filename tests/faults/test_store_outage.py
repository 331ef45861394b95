"""Fault: ClickHouse is unavailable to the projections for a while.

Must hold: nothing is lost (every event is archived once, and every projection equals the
fold of its projector over the log), the lag grows while it is down and drains after, and
no row is duplicated.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest
from clickhouse_connect.driver.exceptions import OperationalError

from events import encode
from infra.adapters.clickhouse.store import AsyncStore, ClickHouseStore
from infra.adapters.kafka.broker import EmbeddedBroker
from streams.ports import ProjectionBatch
from streams.projections import FACTS_TABLE, fold
from tests.conftest import Topics
from tests.integration.test_archive_worker import (
    assert_archive_matches,
    produce,
    stream_events,
    wait_until,
    worker_for,
)

pytestmark = pytest.mark.integration


class Outage:
    """The real store behind a switch: while `down`, every write fails with the driver's
    own error for a lost connection (and is counted)."""

    def __init__(self, store: AsyncStore) -> None:
        self.store = store
        self.down = False
        self.refused = 0

    async def write(self, batch: ProjectionBatch) -> None:
        if self.down:
            self.refused += 1
            raise OperationalError(
                "Error HTTPConnectionPool(host='clickhouse', port=8123): Max retries exceeded"
                " (Caused by NewConnectionError: [Errno 111] Connection refused) (injected)"
            )
        await self.store.write(batch)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


async def test_a_clickhouse_outage_loses_nothing_and_the_lag_drains(
    broker: EmbeddedBroker, topics: Topics, store: ClickHouseStore, tmp_path: Path
) -> None:
    astore = AsyncStore(store)
    outage = Outage(astore)
    group = f"archiver-{uuid.uuid4().hex[:8]}"
    worker = worker_for(broker, topics, tmp_path, outage, app_id=group)  # type: ignore[arg-type]
    before, during = stream_events(10, 20), stream_events(10, 20, offset=20)
    try:
        async with worker.running():
            # Step 1: events flow into ClickHouse.
            await produce(
                broker, topics.events, [(e.stream_id.encode(), encode(e)) for e in before]
            )
            await wait_until(lambda: worker.written == len(before), 60, "the first events")

            # Step 2: ClickHouse goes away; more events arrive. Nothing is written, the
            # worker keeps trying (it does not crash or skip them).
            outage.down = True
            await produce(
                broker, topics.events, [(e.stream_id.encode(), encode(e)) for e in during]
            )
            await wait_until(lambda: outage.refused >= 3, 60, "writes refused during the outage")
            assert worker.written == len(before) and worker.failed is None
        # Step 3: the worker is stopped mid-outage. Its group committed nothing past what
        # was written: exactly the first events' offsets, partition by partition.
        assert await committed_total(broker, topics.events, group) == len(before)

        # Step 4: a new worker of the same group, ClickHouse back: it finds the unwritten
        # events (which it could not, had the first committed past them) and drains them.
        again = worker_for(broker, topics, tmp_path, outage, app_id=group)  # type: ignore[arg-type]
        async with again.running():
            await asyncio.sleep(1.0)  # still down a moment: it retries, it does not skip
            assert again.written == 0
            outage.down = False
            await wait_until(lambda: again.written == len(during), 60, "drain")
        assert await committed_total(broker, topics.events, group) == len(before) + len(during)
    finally:
        astore.close()

    # Step 5: every event once, in order; projections equal the fold; no duplicates.
    everything = before + during
    assert_archive_matches(store, everything)
    rows, distinct = store.archive_counts()
    assert rows == distinct == len(everything)
    assert sorted(map(repr, store.projected_rows(FACTS_TABLE))) == sorted(
        map(repr, fold(everything)[FACTS_TABLE].values())
    )


async def committed_total(broker: EmbeddedBroker, topic: str, group: str) -> int:
    """The offsets `group` committed on `topic`, summed over its partitions."""
    from aiokafka import TopicPartition

    from infra.adapters.kafka.clients import new_consumer

    consumer = new_consumer(bootstrap_servers=broker.bootstrap_servers, group_id=group,
                            enable_auto_commit=False)  # fmt: skip
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        while not partitions:
            await consumer.topics()
            partitions = consumer.partitions_for_topic(topic) or set()
        total = 0
        for p in partitions:
            total += await consumer.committed(TopicPartition(topic, p)) or 0
        return total
    finally:
        await consumer.stop()
