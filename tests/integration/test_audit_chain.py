"""The audit chain over the real archive: the shard's events verify; tampering with the
archive (an altered body, a deleted row) makes `verify` fail naming the event."""

from __future__ import annotations

import pytest

from actors.context import ContextActor, RequestMeta
from events import ContextCreated, MessageReceived, encode
from infra.adapters.clickhouse.store import ClickHouseStore
from infra.adapters.inmemory import InMemoryLog
from infra.services.audit import verify
from streams.archive import archive_row
from tests.factories import FakeClock

pytestmark = pytest.mark.integration


async def archived_context(store: ClickHouseStore) -> list:  # type: ignore[type-arg]
    log = InMemoryLog()
    actor = ContextActor("ctx-a", sink=log, clock=FakeClock())
    meta = RequestMeta(
        context_id="ctx-a",
        tenant_id="t1",
        user_id="u1",
        trace_id="0af7651916cd43dd8448eb211c80319c",
        correlation_id="c1",
    )
    await actor.record([ContextCreated()], meta)
    for i in range(1, 6):
        await actor.record([MessageReceived(message_id=f"m{i}", content=f"hello {i}")], meta)
    events = await log.read_stream("ctx-a")
    store.insert_archive(
        [archive_row(e, encode(e), topic="t", partition=0, offset=i) for i, e in enumerate(events)]
    )
    return events


async def test_the_archive_verifies_until_someone_alters_it(store: ClickHouseStore) -> None:
    events = await archived_context(store)
    clean = verify(store, "t1")
    assert clean["ok"] and clean["streams"] == 1 and clean["events"] == 6

    victim = events[3]
    store.client.command(
        f"ALTER TABLE {store.db}.events UPDATE body = replaceAll(body, 'hello 3', 'HELLO 3')"
        " WHERE event_id = {id:String} SETTINGS mutations_sync = 1",
        parameters={"id": victim.event_id},
    )
    tampered = verify(store, "t1")
    assert not tampered["ok"]
    (found,) = tampered["breaks"]
    assert found["event_id"] == victim.event_id and "altered" in found["problem"]


async def test_a_deleted_event_is_named(store: ClickHouseStore) -> None:
    events = await archived_context(store)
    store.client.command(
        f"DELETE FROM {store.db}.events WHERE event_id = {{id:String}}",
        parameters={"id": events[2].event_id},
    )
    result = verify(store, "t1", "ctx-a")
    assert not result["ok"]
    assert "version 3 is missing" in result["breaks"][0]["problem"]
