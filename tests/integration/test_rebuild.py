"""Rebuilding projections from the archive on real chDB: the rebuilt tables equal the live
ones row for row (and the fold of the log), for a full and a partial rebuild, pooled or not."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

import pytest

from events import MemoryPruned, encode
from infra.adapters.clickhouse.store import ClickHouseStore
from infra.adapters.kafka.broker import EmbeddedBroker
from infra.services import rebuild as rebuilding
from infra.services.rebuild import RebuildError, rebuild
from streams.archive import archive_row
from streams.ports import ProjectionBatch
from streams.projections import ANOMALIES_TABLE, FACTS_TABLE, PRUNES_TABLE, fold, project, table_of
from tests.conftest import Topics
from tests.factories import BASE_TIME, make_event, make_turn

pytestmark = pytest.mark.integration
TABLES = (FACTS_TABLE, ANOMALIES_TABLE, PRUNES_TABLE)


def traffic() -> list[Any]:
    events: list[Any] = []
    for n in range(1, 301):
        outcome = "failed" if n % 7 == 0 else "denied" if n % 11 == 0 else "ok"
        turn = make_turn(n, context=f"ctx-{n % 9}", version=n // 9 * 16 + 1, outcome=outcome)
        events += turn
    prune = MemoryPruned(before=BASE_TIME + timedelta(seconds=100), max_age_days=30, entries=3)
    events.append(make_event("memory-prune:1", 1, prune, n=900_000))
    return events


def project_live(store: ClickHouseStore, events: list[Any]) -> None:
    """What the projection worker does: archive + projected rows (prunes applied)."""
    batch = ProjectionBatch()
    for e in events:
        batch.archive.append(archive_row(e, encode(e), topic="t", partition=0, offset=0))
        row = project(e)
        if row is not None:
            batch.rows.setdefault(table_of(row), []).append(row)
            if table_of(row) == PRUNES_TABLE:
                batch.prunes[row.tenant_id] = row.before  # type: ignore[union-attr]
    store.write(batch)


def snapshot(store: ClickHouseStore) -> dict[str, list[Any]]:
    return {t: store.projected_rows(t) for t in TABLES}


def test_a_rebuild_equals_the_live_projections_row_for_row(store: ClickHouseStore) -> None:
    events = traffic()
    project_live(store, events)
    live = snapshot(store)
    expected = fold(events)
    assert live == {t: [expected[t][k] for k in sorted(expected[t])] for t in TABLES}
    time.sleep(1.1)  # nothing archived "during" the rebuild: no catch-up in this test
    # A projection gone wrong (a row altered, one that no event made): a rebuild that did
    # nothing would leave it so.
    victim = live[FACTS_TABLE][5].event_id
    store.client.command(
        f"ALTER TABLE {store.db}.{FACTS_TABLE} UPDATE text = 'tampered' WHERE event_id = "
        f"'{victim}' SETTINGS mutations_sync = 2"
    )
    store.client.command(
        f"INSERT INTO {store.db}.{FACTS_TABLE} (event_id, tenant_id, at, type) VALUES"
        " ('not-an-event', 't1', now64(6), 'ReplyCompleted')"
    )
    assert snapshot(store) != live

    seen: list[tuple[int, int]] = []
    report = rebuild(
        store, ["facts", "anomalies", "prunes"], progress=lambda d, t: seen.append((d, t))
    )
    assert snapshot(store) == live
    assert report.events == len(events) and report.skipped == 0 and report.caught_up == 0
    assert seen and seen[-1] == (len(events), len(events))
    tables = {r[0] for r in store.client.query("SHOW TABLES FROM " + store.db).result_rows}
    assert not any(t.endswith("__rebuild") for t in tables)


def test_a_lost_projection_comes_back_and_a_partial_rebuild_keeps_the_rest(
    store: ClickHouseStore,
) -> None:
    events = traffic()
    project_live(store, events)
    live = snapshot(store)
    store.client.command(f"TRUNCATE TABLE {store.db}.{FACTS_TABLE}")
    rebuild(store, ["facts"])
    assert snapshot(store) == live
    # Only a time range: the rows outside it are kept as they were.
    rebuild(
        store,
        ["facts"],
        since=BASE_TIME + timedelta(seconds=50),
        until=BASE_TIME + timedelta(seconds=150),
    )
    assert snapshot(store) == live


def test_a_pooled_rebuild_is_the_same(
    store: ClickHouseStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = traffic()
    project_live(store, events)
    live = snapshot(store)
    store.client.command(f"TRUNCATE TABLE {store.db}.{FACTS_TABLE}")
    monkeypatch.setattr(rebuilding, "POOL_FROM", 0)
    monkeypatch.setattr(rebuilding, "PAGE", 500)
    report = rebuild(store, ["facts", "anomalies", "prunes"], workers=2)
    assert snapshot(store) == live and report.events == len(events)


def test_what_is_archived_while_it_runs_is_not_lost(store: ClickHouseStore) -> None:
    events = traffic()
    project_live(store, events[:1000])
    report = rebuild(
        store,
        ["facts"],
        progress=lambda d, t: project_live(store, events[1000:]) if d == t else None,
    )
    assert report.caught_up >= len(events) - 1000
    expected = fold(events)[FACTS_TABLE]
    assert store.projected_rows(FACTS_TABLE) == [expected[k] for k in sorted(expected)]


def test_unknown_projections_are_refused(store: ClickHouseStore) -> None:
    with pytest.raises(RebuildError, match="unknown projections"):
        rebuild(store, ["memory", "facts"])


async def test_a_rebuild_from_the_brokers_log(
    store: ClickHouseStore, broker: EmbeddedBroker, topics: Topics
) -> None:
    """The broker's log as the source (what its retention holds): the same projections."""
    from infra.services.rebuild import BrokerSource
    from tests.integration.test_archive_worker import produce

    events = traffic()
    await produce(broker, topics.events, [(e.stream_id.encode(), encode(e)) for e in events])
    source = BrokerSource(broker.bootstrap_servers, topics.events)
    report = await asyncio.to_thread(
        rebuild, store, ["facts", "anomalies", "prunes"], source="broker", broker=source
    )
    assert report.events == len(events)
    expected = fold(events)
    assert snapshot(store) == {t: [expected[t][k] for k in sorted(expected[t])] for t in TABLES}
    # A time range from the log: only its events.
    since, until = BASE_TIME + timedelta(seconds=50), BASE_TIME + timedelta(seconds=150)
    store.client.command(f"TRUNCATE TABLE {store.db}.{FACTS_TABLE}")
    await asyncio.to_thread(
        rebuild, store, ["facts"], since=since, until=until, source="broker", broker=source
    )
    inside = [e for e in events if since <= e.occurred_at < until]
    want = fold(inside)[FACTS_TABLE]
    assert store.projected_rows(FACTS_TABLE) == [want[k] for k in sorted(want)]


async def test_a_rebuild_from_a_log_that_starts_after_the_archive_is_refused(
    store: ClickHouseStore, broker: EmbeddedBroker, topics: Topics
) -> None:
    """A log that lost its older events (retention, a broker that restarted empty) must not
    replace projections built from them: the rebuild refuses, and the tables are as before."""
    from infra.services.rebuild import BrokerSource
    from tests.integration.test_archive_worker import produce

    events = traffic()
    project_live(store, events)  # the archive and projections hold all of it
    before = snapshot(store)
    newer = events[len(events) // 2 :]
    await produce(broker, topics.events, [(e.stream_id.encode(), encode(e)) for e in newer])
    source = BrokerSource(broker.bootstrap_servers, topics.events)
    with pytest.raises(RebuildError, match="would drop the older rows"):
        await asyncio.to_thread(rebuild, store, ["facts"], source="broker", broker=source)
    assert snapshot(store) == before
