"""The log comes back from the archive: the embedded broker (tansu, memory storage) starts
empty every time, while the ClickHouse archive keeps every event byte for byte.

On start, before any shard reads a stream, the archived events are appended to the new log
again, exactly as they were archived, each stream in version order on its own partition.
Then everything that reads the log finds what it held before the restart: a shard rebuilds
its contexts (versions, owning tenant, the hash chain), its limiters' windows and the
bandit's feedback; workflow runs resume; a rebuild from the broker sees all of it. The
projection worker's group is committed at the end of what was restored, so the archive and
the projections are not written a second time.

With an external broker nothing is re-published: a log that holds fewer events than the
archive (retention, or topics recreated on an empty cluster) is detected and logged, and
`replay rebuild --source broker` refuses to rebuild from it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from events import topics
from infra.adapters.clickhouse.rebuilds import archived_count, archived_records
from infra.adapters.clickhouse.store import ClickHouseStore
from infra.adapters.kafka.clients import new_consumer, new_producer, partition_for

log = logging.getLogger(__name__)

PAGE = 20_000


@dataclass
class Restored:
    events: int = 0
    seconds: float = 0.0
    ends: dict[int, int] = field(default_factory=dict)
    """Per partition, the offset after the last restored event."""


async def log_is_empty(bootstrap_servers: str, topic: str) -> bool:
    """Whether the topic holds no record at all (a broker that has lost its log)."""
    from aiokafka import TopicPartition

    consumer = new_consumer(bootstrap_servers=bootstrap_servers, enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer.topics()
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        if not parts:
            return True
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        fetched = await consumer.getmany(timeout_ms=1000, max_records=1)
        return not any(fetched.values())
    finally:
        await consumer.stop()


async def republish(
    store: ClickHouseStore,
    bootstrap_servers: str,
    topic: str,
    *,
    max_request_size: int,
    progress: Callable[[int, int], None] | None = None,
) -> Restored:
    """Append every archived event to `topic` again (its bytes as archived, key = stream)."""

    total = archived_count(store)
    done = Restored()
    if total == 0:
        return done
    started = time.perf_counter()
    producer = new_producer(
        bootstrap_servers=bootstrap_servers,
        acks="all",
        linger_ms=5,
        max_request_size=max_request_size,
        client_id="chatllm-restore",
    )
    await producer.start()
    try:
        partitions = sorted(await producer.partitions_for(topic))
        for page in archived_records(store, PAGE):
            pending = [
                await producer.send(
                    topic,
                    key=stream.encode(),
                    value=body.encode(),
                    partition=partition_for(stream, partitions),
                    # An erased event keeps what its chain hash is made of.
                    headers=[(topics.ERASED_DIGEST, digest.encode())] if digest else None,
                )
                for stream, body, digest in page
            ]
            for sent in await asyncio.gather(*pending):
                done.ends[sent.partition] = max(done.ends.get(sent.partition, 0), sent.offset + 1)
            done.events += len(page)
            if progress is not None:
                progress(done.events, total)
    finally:
        await producer.stop()
    done.seconds = time.perf_counter() - started
    return done


async def commit_at(bootstrap_servers: str, group: str, topic: str, ends: dict[int, int]) -> None:
    """Commit `group`'s offsets on `topic` at `ends` (what it has already seen)."""
    from aiokafka import TopicPartition
    from aiokafka.structs import OffsetAndMetadata

    if not ends:
        return
    consumer = new_consumer(
        bootstrap_servers=bootstrap_servers, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        parts = {TopicPartition(topic, p): OffsetAndMetadata(end, "") for p, end in ends.items()}
        consumer.assign(list(parts))
        await consumer.commit(parts)
    finally:
        await consumer.stop()


async def restore_embedded_log(
    store: ClickHouseStore,
    bootstrap_servers: str,
    topic: str,
    projector_group: str,
    *,
    max_request_size: int,
    progress: Callable[[int, int], None] | None = None,
) -> Restored:
    """Bring the embedded broker's empty log back from the archive."""
    if not await log_is_empty(bootstrap_servers, topic):
        return Restored()
    restored = await republish(
        store, bootstrap_servers, topic, max_request_size=max_request_size, progress=progress
    )
    # The projections already hold all of it: the worker starts after it.
    await commit_at(bootstrap_servers, projector_group, topic, restored.ends)
    if restored.events:
        log.info(
            "restored the log from the archive: %d events in %.1f s (%.0f events/s)",
            restored.events,
            restored.seconds,
            restored.events / max(restored.seconds, 1e-9),
        )
    return restored


async def check_external_log(store: ClickHouseStore, bootstrap_servers: str, topic: str) -> bool:
    """With an external broker: False (and an error in the log) when the archive holds
    events but the log holds none: the topics were recreated on an empty cluster."""
    if archived_count(store) == 0:
        return True
    if await log_is_empty(bootstrap_servers, topic):
        log.error(
            "the broker's %s topic is empty but the archive holds events: the log was lost"
            " (topics recreated?). Contexts older than the log cannot be continued from it;"
            " rebuild projections with --source archive.",
            topic,
        )
        return False
    return True
