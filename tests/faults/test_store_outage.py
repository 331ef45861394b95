"""Fault: ClickHouse is unavailable to the projections for a while.

Must hold: nothing is lost (every event is archived once, and every projection equals the
fold of its projector over the log), the lag grows while it is down and drains after, and
no row is duplicated.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

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
    """The real store behind a switch: while `down`, every write fails as a lost
    connection would (and is counted)."""

    def __init__(self, store: AsyncStore) -> None:
        self.store = store
        self.down = False
        self.refused = 0

    async def write(self, batch: ProjectionBatch) -> None:
        if self.down:
            self.refused += 1
            raise ConnectionError("ClickHouse is unreachable (injected)")
        await self.store.write(batch)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


async def test_a_clickhouse_outage_loses_nothing_and_the_lag_drains(
    broker: EmbeddedBroker, topics: Topics, store: ClickHouseStore, tmp_path: Path
) -> None:
    astore = AsyncStore(store)
    outage = Outage(astore)
    worker = worker_for(broker, topics, tmp_path, outage)  # type: ignore[arg-type]
    before, during = stream_events(10, 20), stream_events(10, 20, offset=20)
    try:
        async with worker.running():
            # Step 1: events flow into ClickHouse.
            await produce(
                broker, topics.events, [(e.stream_id.encode(), encode(e)) for e in before]
            )
            await wait_until(lambda: worker.written == len(before), 60, "the first events")

            # Step 2: ClickHouse goes away; more events arrive. Nothing is written, the
            # worker keeps trying (it does not crash, skip or commit past them).
            outage.down = True
            went_down = time.monotonic()
            await produce(
                broker, topics.events, [(e.stream_id.encode(), encode(e)) for e in during]
            )
            await wait_until(lambda: outage.refused >= 3, 60, "writes refused during the outage")
            await asyncio.sleep(2.0)
            assert worker.written == len(before) and worker.failed is None

            # The lag grows: the whole second batch waits on the log, unwritten.
            backlog = len(before) + len(during) - worker.written
            assert backlog == len(during)

            # Step 3: ClickHouse is back: the backlog drains.
            outage.down = False
            await wait_until(lambda: worker.written == len(before) + len(during), 60, "drain")
            assert time.monotonic() - went_down >= 2.0
    finally:
        astore.close()

    # Step 4: every event once, in order; projections equal the fold; no duplicates.
    everything = before + during
    assert_archive_matches(store, everything)
    rows, distinct = store.archive_counts()
    assert rows == distinct == len(everything)
    assert sorted(map(repr, store.projected_rows(FACTS_TABLE))) == sorted(
        map(repr, fold(everything)[FACTS_TABLE].values())
    )
