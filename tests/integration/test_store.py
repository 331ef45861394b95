"""The ClickHouse store on real chDB: migrations, dedup, clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from events import encode
from infra.adapters.clickhouse.store import ClickHouseStore, StoreError
from infra.config import ClickHouseConfig
from streams.archive import archive_row
from tests.factories import make_event

pytestmark = pytest.mark.integration


def test_migrations_are_idempotent(store: ClickHouseStore) -> None:
    # The fixture migrated once; again applies nothing and changes nothing.
    assert store.migrate() == []
    assert store.migrate() == []
    versions = store.client.query(
        f"SELECT version FROM {store.db}.schema_migrations FINAL ORDER BY version"
    ).result_rows
    assert versions == [(1,), (2,), (3,), (4,), (5,)]


def test_duplicate_rows_are_read_once(store: ClickHouseStore) -> None:
    events = [make_event("ctx-1", v) for v in range(1, 4)]
    rows = [
        archive_row(e, encode(e), topic="t", partition=0, offset=v) for v, e in enumerate(events)
    ]
    store.insert_archive(rows)
    store.insert_archive(rows)  # at-least-once delivery wrote them again
    assert store.archive_counts() == (6, 3)  # stored twice before any merge ...
    assert [r.event_id for r in store.stream_events("t1", "ctx-1")] == [e.event_id for e in events]


def test_timestamps_keep_microseconds_in_utc(store: ClickHouseStore) -> None:
    event = make_event()
    store.insert_archive([archive_row(event, encode(event), topic="t", partition=0, offset=0)])
    (record,) = store.stream_events("t1", "ctx-1")
    assert record.occurred_at.replace(tzinfo=event.occurred_at.tzinfo) == event.occurred_at


def test_a_second_chdb_path_in_one_process_is_a_clear_error(
    store: ClickHouseStore, tmp_path: Path
) -> None:
    with pytest.raises(StoreError, match="one data path per process"):
        ClickHouseStore(ClickHouseConfig(path=str(tmp_path / "other"))).open()


def test_a_path_held_by_another_process_is_a_clear_error(store: ClickHouseStore) -> None:
    code = (
        "from infra.config import ClickHouseConfig\n"
        "from infra.adapters.clickhouse.store import ClickHouseStore\n"
        f"ClickHouseStore(ClickHouseConfig(path={store.config.path!r})).open()"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "another process has this chDB path open" in result.stderr


async def test_search_filters_and_pages_through_any_size(store: ClickHouseStore) -> None:
    from datetime import timedelta

    from events import ReplyCompleted
    from infra.adapters.clickhouse.reads import EventFilter
    from infra.adapters.clickhouse.store import AsyncStore
    from tests.factories import BASE_TIME

    events = [make_event("ctx-a", v, n=v) for v in range(1, 6)]  # MessageReceived, users u1
    events.append(
        make_event(
            "ctx-b",
            1,
            n=50,
            user_id="u2",
            payload=ReplyCompleted(
                message_id="r",
                in_reply_to="m",
                content="Lisbon trams",
                model="demo-large",
                latency_ms=1,
            ),
        )
    )
    events.append(make_event("ctx-c", 1, n=60, tenant_id="other"))
    store.insert_archive(
        [archive_row(e, encode(e), topic="t", partition=0, offset=i) for i, e in enumerate(events)]
    )
    astore = AsyncStore(store)
    try:

        async def ids(where: EventFilter, **kw: object) -> list[str]:
            return [e.event_id async for page in astore.search(where, **kw) for e in page]  # type: ignore[arg-type]

        mine = EventFilter(tenant_id="t1")
        # Step 1: the tenant sees its own 6 events, in time order, never the other tenant's.
        assert await ids(mine) == [e.event_id for e in events[:6]]
        # Step 2: pages of 2 give the same sequence (keyset pagination, no gap or repeat).
        assert await ids(mine, page_size=2) == [e.event_id for e in events[:6]]
        assert await ids(mine, limit=3, page_size=2) == [e.event_id for e in events[:3]]
        # Step 3: every filter narrows.
        by = lambda **kw: EventFilter(tenant_id="t1", **kw)  # noqa: E731
        assert await ids(by(types=("ReplyCompleted",))) == [events[5].event_id]
        assert await ids(by(user_id="u2")) == [events[5].event_id]
        assert await ids(by(model="demo-large")) == [events[5].event_id]
        assert await ids(by(text="lisbon TRAMS")) == [events[5].event_id]
        assert await ids(by(context_id="ctx-a")) == [e.event_id for e in events[:5]]
        window = by(since=BASE_TIME + timedelta(seconds=2), until=BASE_TIME + timedelta(seconds=4))
        assert await ids(window) == [events[1].event_id, events[2].event_id]
    finally:
        astore.close()


def test_memory_holds_ten_thousand_conversations_of_one_context(store: ClickHouseStore) -> None:
    from streams.ports import ProjectionBatch
    from streams.projections import project, table_of
    from tests.factories import make_turn

    batch = ProjectionBatch()
    version = 1
    for n in range(1, 10_001):
        for event in make_turn(n, context="busy", version=version):
            row = project(event)
            assert row is not None
            batch.rows.setdefault(table_of(row), []).append(row)
            version += 1
    store.write(batch)
    stats = store.memory_stats("t1")
    assert stats["total"] == 10_000 and stats["by_context"] == {"busy": 10_000}
    page = store.memory("t1", context_id="busy", limit=50, offset=9_990)
    assert len(page) == 10 and page[-1]["conversation_id"] == "turn-1"


async def test_a_large_export_holds_one_page_in_memory(store: ClickHouseStore) -> None:
    """The request log's export pages with a keyset: Python's memory does not grow with the
    number of events exported."""
    import tracemalloc

    from infra.adapters.clickhouse.reads import EventFilter
    from infra.adapters.clickhouse.store import AsyncStore

    events = [make_event(f"ctx-{i % 100}", i // 100 + 1, n=i + 1) for i in range(40_000)]
    store.insert_archive(
        [archive_row(e, encode(e), topic="t", partition=0, offset=i) for i, e in enumerate(events)]
    )
    astore = AsyncStore(store)
    try:
        tracemalloc.start()
        seen = 0
        async for page in astore.search(EventFilter(tenant_id="t1"), page_size=1000):
            seen += len(page)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        astore.close()
    assert seen == len(events)
    body_bytes = sum(len(encode(e)) for e in events)
    # One page of 1,000 events is ~2.5% of the bodies; allow ten pages' worth of slack.
    assert peak < body_bytes / 4, (peak, body_bytes)
