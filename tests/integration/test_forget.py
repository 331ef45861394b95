"""Forgetting a user on the real archive: their content is gone from the archive and the
projections, other users' is not, and the audit chain still verifies."""

from __future__ import annotations

import pytest

from actors.context import ContextActor, RequestMeta
from events import ContextCreated, MessageReceived, decode, encode
from infra.adapters.clickhouse.store import ClickHouseStore
from infra.adapters.inmemory import InMemoryLog
from infra.services.audit import verify
from streams.archive import archive_row
from streams.ports import ProjectionBatch
from streams.projections import FACTS_TABLE, project, table_of
from tests.factories import FakeClock

pytestmark = pytest.mark.integration


def meta(user: str) -> RequestMeta:
    return RequestMeta(
        context_id="ctx-f",
        tenant_id="t1",
        user_id=user,
        trace_id="0af7651916cd43dd8448eb211c80319c",
        correlation_id=f"c-{user}",
    )


async def test_forget_erases_one_users_content_and_the_chain_still_holds(
    store: ClickHouseStore,
) -> None:
    log = InMemoryLog()
    actor = ContextActor("ctx-f", sink=log, clock=FakeClock())
    await actor.record([ContextCreated(title="alice's plans")], meta("alice"))
    await actor.record([MessageReceived(message_id="a1", content="my secret")], meta("alice"))
    await actor.record([MessageReceived(message_id="b1", content="bob here")], meta("bob"))
    await actor.record([MessageReceived(message_id="a2", content="more secrets")], meta("alice"))
    events = await log.read_stream("ctx-f")
    batch = ProjectionBatch()
    for i, e in enumerate(events):
        batch.archive.append(archive_row(e, encode(e), topic="t", partition=0, offset=i))
        row = project(e)
        assert row is not None
        batch.rows.setdefault(table_of(row), []).append(row)
    store.write(batch)

    assert store.forget_user("t1", "alice") == 3
    assert store.forget_user("t1", "alice") == 0  # idempotent
    bodies = [r.body for r in store.stream_events("t1", "ctx-f")]
    assert not any("secret" in b or "alice's plans" in b for b in bodies)
    assert any("bob here" in b for b in bodies)
    kept = [decode(b.encode()) for b in bodies]
    assert [e.event_id for e in kept] == [e.event_id for e in events]  # the events remain
    texts = {r.user_id: r.text for r in store.projected_rows(FACTS_TABLE) if r.text}
    assert texts == {"bob": "bob here"}
    raw = store.client.query(
        f"SELECT count() FROM {store.db}.events WHERE positionCaseInsensitive(body, 'secret') > 0"
    ).result_rows[0][0]
    assert raw == 0  # gone from every part on disk, not only from FINAL reads
    assert verify(store, "t1")["ok"]
