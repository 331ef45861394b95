"""The ingest loop on the real broker: a record the log refuses is a dead letter, a log that
keeps failing is retried a bounded number of times while health says what is stuck, and a
stop while it is stuck is prompt (at-least-once: the batch stays uncommitted)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError

from events import Envelope, encode
from events import topics as topic_names
from infra.adapters.clickhouse.store import AsyncStore, ClickHouseStore
from infra.adapters.kafka.broker import EmbeddedBroker
from infra.adapters.kafka.clients import LogUnavailable
from streams.app import ProjectionWorker
from tests.conftest import Topics
from tests.factories import make_event
from tests.integration.test_archive_worker import produce, read_all, wait_until, worker_for

pytestmark = pytest.mark.integration


class FailingLog:
    """An appender (the event log) that refuses some events for good, and fails for a while
    with a transient error, as aiokafka does (LogUnavailable wrapping the driver's error)."""

    def __init__(self, refused: set[str], transient_failures: int = 0) -> None:
        self.refused = refused
        self.transient_failures = transient_failures
        self.appended: list[Envelope[Any]] = []
        self.calls = 0

    async def append(self, events: Sequence[Envelope[Any]]) -> None:
        self.calls += 1
        if self.transient_failures:
            self.transient_failures -= 1
            raise LogUnavailable("no ack") from KafkaConnectionError("broker went away")
        if any(e.event_id in self.refused for e in events):
            raise LogUnavailable("refused") from MessageSizeTooLargeError("too large")
        self.appended.extend(events)


def ingest_worker(
    broker: EmbeddedBroker,
    topics: Topics,
    store: AsyncStore,
    log: FailingLog,
    app_id: str = "",
    **extra: Any,
) -> ProjectionWorker:
    """A worker whose ingest loop appends to `log` (its settings plus `extra`)."""
    return worker_for(
        broker,
        topics,
        Path(),
        store,
        app_id=app_id or f"ingest-{uuid.uuid4().hex[:8]}",
        settings={"ingest_topic": topics.ingest, **extra},
        appender=log,
        new_event_id=lambda: str(uuid.uuid4()),
    )


async def test_an_event_the_log_refuses_is_dead_lettered_and_the_rest_appended(
    broker: EmbeddedBroker, topics: Topics, store: ClickHouseStore, tmp_path: Path
) -> None:
    events = [make_event(f"ext:s{i}", 1, n=uuid.uuid4().int % 10**9) for i in range(6)]
    log = FailingLog(refused={events[2].event_id})
    await produce(broker, topics.ingest, [(e.stream_id.encode(), encode(e)) for e in events])
    astore = AsyncStore(store)
    worker = ingest_worker(broker, topics, astore, log)
    try:
        async with worker.running():
            await wait_until(lambda: worker.ingested == 5, 60, "the five appendable events")
            await wait_until(lambda: worker.dead_lettered == 1, 20, "the refused one, dead")
    finally:
        astore.close()
    assert sorted(e.event_id for e in log.appended) == sorted(
        e.event_id for i, e in enumerate(events) if i != 2
    )
    (dead,) = await read_all(broker, topics.deadletter, expected=1)
    headers = {k: v.decode() for k, v in dead.headers}
    assert dead.value == encode(events[2])  # byte for byte
    assert headers[topic_names.DLQ_REASON].startswith("the log refused it: MessageSizeTooLarge")


async def test_a_failing_log_shows_as_stuck_then_the_batch_is_dead_lettered(
    broker: EmbeddedBroker, topics: Topics, store: ClickHouseStore, tmp_path: Path
) -> None:
    event = make_event("ext:stuck", 1, n=uuid.uuid4().int % 10**9)
    log = FailingLog(refused=set(), transient_failures=10**6)  # it never recovers
    await produce(broker, topics.ingest, [(event.stream_id.encode(), encode(event))])
    astore = AsyncStore(store)
    worker = ingest_worker(broker, topics, astore, log, max_append_attempts=6, stuck_after_s=0.5)
    try:
        async with worker.running():
            # While it retries, health names the loop and the driver's error.
            await wait_until(
                lambda: worker.health()["ingest"].report()["status"] == "stuck", 30, "stuck"
            )
            report = worker.health()["ingest"].report()
            assert "KafkaConnectionError" in report["last_error"], report
            assert "KafkaConnectionError" in report["reason"], report
            assert worker.health()["archive"].report()["status"] != "stuck"
            # The bound: after max_append_attempts the batch is a dead letter, and the loop
            # is healthy again.
            await wait_until(lambda: worker.dead_lettered == 1, 30, "the dead letter")
            await wait_until(
                lambda: worker.health()["ingest"].report()["status"] == "ok", 10, "recovered"
            )
    finally:
        astore.close()
    assert log.calls == 6
    (dead,) = await read_all(broker, topics.deadletter, expected=1)
    reason = dict(dead.headers)[topic_names.DLQ_REASON].decode()
    assert reason.startswith("not appended: KafkaConnectionError") and "attempt 6" in reason


async def test_a_stop_while_the_log_fails_is_prompt_and_commits_nothing(
    broker: EmbeddedBroker, topics: Topics, store: ClickHouseStore, tmp_path: Path
) -> None:
    event = make_event("ext:stop", 1, n=uuid.uuid4().int % 10**9)
    log = FailingLog(refused=set(), transient_failures=10**6)
    await produce(broker, topics.ingest, [(event.stream_id.encode(), encode(event))])
    astore = AsyncStore(store)
    worker = ingest_worker(
        broker, topics, astore, log, max_append_attempts=10**6, finish_timeout_s=1.0
    )
    group = worker.settings.app_id
    try:
        async with worker.running():
            await wait_until(lambda: log.calls >= 3, 30, "retries")
            stopping = time.monotonic()
        took = time.monotonic() - stopping
    finally:
        astore.close()
    assert took < 5.0, f"the stop took {took:.1f} s"
    # Nothing was committed: the next owner of the group reads the event again.
    recovered = FailingLog(refused=set())
    astore = AsyncStore(store)
    again = ingest_worker(broker, topics, astore, recovered, app_id=group)
    try:
        async with again.running():
            await wait_until(lambda: again.ingested == 1, 60, "the event, read again")
    finally:
        astore.close()
    assert [e.event_id for e in recovered.appended] == [event.event_id]
