"""The log comes back from the archive (infra/services/restore.py), on the real broker and chDB: an
empty log beside a full archive is noticed; re-published, every stream is back in version
order, byte for byte, and the projection group starts after it."""

from __future__ import annotations

import asyncio
import logging
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from events import encode
from infra.adapters.clickhouse.store import ClickHouseStore
from infra.adapters.kafka.broker import EmbeddedBroker
from infra.services.restore import check_external_log, restore_embedded_log
from tests.conftest import Topics
from tests.integration.test_archive_worker import read_all
from tests.integration.test_rebuild import project_live, traffic

pytestmark = pytest.mark.integration


async def committed(broker: EmbeddedBroker, group: str, topic: str) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap_servers, group_id=group)
    await consumer.start()
    try:
        await consumer.topics()
        found = {}
        for p in consumer.partitions_for_topic(topic) or ():
            offset = await consumer.committed(TopicPartition(topic, p))
            if offset is not None:
                found[p] = offset
        return found
    finally:
        await consumer.stop()


def test_an_empty_log_beside_a_full_archive_is_noticed_then_restored(
    store: ClickHouseStore,
    broker: EmbeddedBroker,
    topics: Topics,
    caplog: pytest.LogCaptureFixture,
) -> None:
    events = traffic()
    project_live(store, events)  # the archive holds them; the (new) log holds nothing

    # Step 1: an external broker in this state is reported, not silently used.
    with caplog.at_level(logging.ERROR, logger="infra.services.restore"):
        lost = asyncio.run(check_external_log(store, broker.bootstrap_servers, topics.events))
    assert lost is False
    assert "the log was lost" in caplog.text

    # Step 2: the embedded broker's log is re-published from the archive.
    group = f"projector-{uuid.uuid4().hex[:6]}"
    restored = asyncio.run(
        restore_embedded_log(
            store, broker.bootstrap_servers, topics.events, group, max_request_size=2**20
        )
    )
    assert restored.events == len(events)
    records = asyncio.run(read_all(broker, topics.events, expected=len(events)))
    assert sorted(r.value for r in records) == sorted(encode(e) for e in events)  # exact bytes
    by_stream: dict[bytes, list[tuple[int, int, bytes]]] = {}
    for r in records:
        by_stream.setdefault(r.key, []).append((r.partition, r.offset, r.value))
    for stream, placed in by_stream.items():
        assert len({p for p, _, _ in placed}) == 1, f"{stream!r} spread over partitions"
        in_log = [v for _, _, v in sorted(placed)]
        expected = sorted(
            (e for e in events if e.stream_id.encode() == stream), key=lambda e: e.stream_version
        )
        assert in_log == [encode(e) for e in expected], f"{stream!r} out of version order"
    # The projection group starts after what it already has.
    assert asyncio.run(committed(broker, group, topics.events)) == restored.ends
    assert sum(restored.ends.values()) == len(events)

    # Step 3: a log that holds events is not restored again, and is not reported.
    again = asyncio.run(
        restore_embedded_log(
            store, broker.bootstrap_servers, topics.events, group, max_request_size=2**20
        )
    )
    assert again.events == 0
    assert asyncio.run(check_external_log(store, broker.bootstrap_servers, topics.events))
