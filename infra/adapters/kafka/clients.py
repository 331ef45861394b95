"""Kafka adapters on aiokafka: the event sink (producer), a stream reader, topic set-up."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from aiokafka.partitioner import DefaultPartitioner

from events import DecodeError, Envelope, decode, encode, topics
from events.chain import on_chain
from infra.config import BrokerConfig

log = logging.getLogger(__name__)


class LogUnavailable(RuntimeError):
    """The broker did not acknowledge an append in time; nothing is acknowledged to the caller."""


def new_consumer(*topics: str, bootstrap_servers: str, **options: Any) -> AIOKafkaConsumer:
    """An aiokafka consumer. Every Kafka client of infra is made here (new_consumer,
    new_producer, new_admin): one place for what all of them share, such as the security
    settings a production cluster asks for. (streams/loop.py makes the batch loop's own:
    streams may not import infra.)"""
    return AIOKafkaConsumer(*topics, bootstrap_servers=bootstrap_servers, **options)


def new_producer(*, bootstrap_servers: str, **options: Any) -> AIOKafkaProducer:
    """An aiokafka producer (see new_consumer)."""
    return AIOKafkaProducer(bootstrap_servers=bootstrap_servers, **options)


def new_admin(*, bootstrap_servers: str, **options: Any) -> AIOKafkaAdminClient:
    """An aiokafka admin client (see new_consumer)."""
    return AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, **options)


async def ensure_topics(bootstrap_servers: str, names: Iterable[str], partitions: int) -> None:
    """Create the topics that do not exist yet (existing ones are left as they are)."""
    admin = new_admin(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [n for n in names if n not in existing]
        if missing:
            result = await admin.create_topics(
                [NewTopic(n, num_partitions=partitions, replication_factor=1) for n in missing]
            )
            for topic, code, message in result.topic_errors:
                if code not in (0, TopicAlreadyExistsError.errno):
                    raise KafkaError(f"creating topic {topic!r} failed: {code} {message}")
    finally:
        await admin.close()


class KafkaEventSink:
    """Appends events to the log: key = stream_id, acks=all, acknowledged before returning."""

    def __init__(self, bootstrap_servers: str, topic: str, config: BrokerConfig) -> None:
        self._topic = topic
        self._timeout_s = config.delivery_timeout_ms / 1000
        # The producer is made in start(): aiokafka binds it to the running loop.
        self._options: dict[str, Any] = dict(
            bootstrap_servers=bootstrap_servers,
            acks="all",
            enable_idempotence=config.enable_idempotence,
            linger_ms=config.linger_ms,
            request_timeout_ms=config.request_timeout_ms,
            # Room for one record of broker.max_record_bytes and its batch framing.
            max_request_size=config.max_request_bytes,
            client_id="chatllm-events",
        )
        self._producer: Any = None
        self._started = False
        self._lock = asyncio.Lock()
        self._partitions: dict[str, int] = {}
        self._available: list[int] | None = None  # the topic's partitions (they never shrink)

    async def start(self) -> None:
        async with self._lock:
            if not self._started:
                self._producer = new_producer(**self._options)
                try:
                    await self._producer.start()
                except BaseException as exc:
                    with contextlib.suppress(Exception):
                        await self._producer.stop()
                    if isinstance(exc, KafkaError):
                        raise LogUnavailable(f"cannot reach the event log: {exc!r}") from exc
                    raise
                self._started = True

    async def stop(self) -> None:
        async with self._lock:
            if self._started:
                self._started = False
                await asyncio.wait_for(self._producer.stop(), self._timeout_s)

    async def _partition(self, stream_id: str) -> int:
        # The default partitioner's choice, computed once per stream: its murmur2 is pure
        # Python, and a turn writes several events of one stream.
        partition = self._partitions.get(stream_id)
        if partition is None:
            if self._available is None:
                self._available = sorted(await self._producer.partitions_for(self._topic))
            partition = partition_for(stream_id, self._available)
            if len(self._partitions) > 100_000:
                self._partitions.clear()
            self._partitions[stream_id] = partition
        return partition

    async def append(self, events: Sequence[Envelope[Any]]) -> None:
        if not self._started:
            await self.start()
        # One send per event (batched by linger), then wait for every ack.
        records = [
            (event.stream_id.encode(), encode(event), await self._partition(event.stream_id))
            for event in events
        ]
        await self.send(records, f"{len(events)} events")

    async def send(self, records: Sequence[tuple[bytes, bytes, int | None]], what: str) -> None:
        """Send (key, value, partition or None) records to the topic and wait for every ack;
        the bound keeps a dead broker from hanging the caller forever."""
        if not self._started:
            await self.start()
        try:
            pending = [
                await self._producer.send(self._topic, key=key, value=value, partition=partition)
                for key, value, partition in records
            ]
            await asyncio.wait_for(asyncio.gather(*pending), self._timeout_s)
        except (KafkaError, TimeoutError) as exc:
            raise LogUnavailable(f"the event log did not acknowledge {what}: {exc!r}") from exc


class KafkaObservationSink:
    """Publishes keyed observation records (events/observations.py) with the event sink's
    producer settings; returns once every record is acknowledged."""

    def __init__(self, bootstrap_servers: str, topic: str, config: BrokerConfig) -> None:
        self._sink = KafkaEventSink(bootstrap_servers, topic, config)

    async def publish(self, records: Sequence[tuple[str, bytes]]) -> None:
        await self._sink.send(
            [(key.encode(), value, None) for key, value in records],
            f"{len(records)} observation records",
        )

    async def stop(self) -> None:
        await self._sink.stop()


def partition_for(key: str, partitions: Sequence[int]) -> int:
    """The partition the default producer partitioner puts `key` on."""
    ordered = sorted(partitions)
    partition: int = DefaultPartitioner()(key.encode(), ordered, ordered)
    return partition


def _erased_digest(record: Any) -> str | None:
    for name, value in record.headers or ():
        if name == topics.ERASED_DIGEST:
            return bytes(value).decode()
    return None


class _Rewound(Exception):
    """The partition ends before where it was read up to before."""


class KafkaStreamReader:
    """Reads the log back: one stream from its partition, or chosen events from every
    partition.

    For single streams it keeps, per partition, each stream's first offset and how far the
    partition has been indexed. Bringing that index up to the partition's end is one scan
    at a time per partition, shared by every read waiting on it; a stream the index does
    not know has no events (no further read), a known one is read from its first event.
    Without this every new context's first turn scanned its whole partition, and a load of
    new conversations slowed to a crawl as the log grew. Long as a class: the index and the
    two kinds of read share its state."""

    def __init__(self, bootstrap_servers: str, topic: str, timeout_s: float = 30.0) -> None:
        self._bootstrap = bootstrap_servers
        self._topic = topic
        self._timeout_s = timeout_s
        self._indexed: dict[int, int] = {}
        """Per partition: the offset up to which every stream's start is known."""
        self._starts: dict[int, dict[bytes, int]] = {}
        """Per partition: each stream's (record key's) first offset."""
        self._caught_up_at: dict[int, float] = {}
        """Per partition: when the last completed catch-up scan began."""
        self._locks: dict[int, asyncio.Lock] = {}
        self._partitions: list[int] | None = None

    async def _consumer(self) -> Any:
        consumer = new_consumer(
            bootstrap_servers=self._bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            client_id="chatllm-stream-reader",
            # An empty partition would otherwise hold each fetch for 500 ms: a new
            # context's first turn waits on this read.
            fetch_max_wait_ms=10,
        )
        try:
            await consumer.start()
        except KafkaError as exc:
            with contextlib.suppress(Exception):
                await consumer.stop()
            raise LogUnavailable(f"cannot read the event log: {exc!r}") from exc
        return consumer

    async def _scan(
        self,
        keep: Callable[[Any], bool],
        partitions: Collection[int] | None = None,
        start: int = 0,
        seen: Callable[[Any], None] | None = None,
    ) -> list[tuple[Envelope[Any], str | None]]:
        """Decoded events of the records `keep` accepts, in `partitions` (all by default)
        from offset `start`, up to each partition's end now; `seen` is told of every record.
        Each event comes with its erased payload's digest, when it was re-published erased."""
        consumer = await self._consumer()
        try:
            await consumer.topics()  # refreshes the metadata
            known = consumer.partitions_for_topic(self._topic)
            if not known:
                return []
            chosen = sorted(known) if partitions is None else sorted(set(partitions) & known)
            pending = {TopicPartition(self._topic, p) for p in chosen}
            if not pending:
                return []
            consumer.assign(list(pending))
            if start:
                for tp in pending:
                    consumer.seek(tp, start)
            else:
                await consumer.seek_to_beginning(*pending)
            found: list[tuple[Envelope[Any], str | None]] = []
            deadline = asyncio.get_running_loop().time() + self._timeout_s
            while pending:
                batches = await consumer.getmany(*pending, timeout_ms=20)
                for records in batches.values():
                    for record in records:
                        if seen is not None:
                            seen(record)
                        if not record.value or not keep(record):
                            continue
                        try:
                            found.append((decode(record.value), _erased_digest(record)))
                        except DecodeError:
                            continue  # not an event; the archive processor dead-letters it
                for tp in list(pending):
                    highwater = consumer.highwater(tp)
                    if highwater is not None and highwater < start:
                        raise _Rewound  # the partition is shorter than we read it before
                    if highwater is not None and await consumer.position(tp) >= highwater:
                        pending.discard(tp)
                if pending and asyncio.get_running_loop().time() > deadline:
                    raise LogUnavailable(f"could not read the log within {self._timeout_s}s")
            return found
        except KafkaError as exc:
            raise LogUnavailable(f"reading the event log failed: {exc!r}") from exc
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(consumer.stop(), self._timeout_s)

    async def _catch_up(self, partition: int) -> None:
        """Index `partition` up to its end as of this call: one scan at a time; a read that
        arrives while one runs waits for it, then for one that began after it arrived."""
        asked_at = time.monotonic()
        lock = self._locks.setdefault(partition, asyncio.Lock())
        async with lock:
            if self._caught_up_at.get(partition, float("-inf")) >= asked_at:
                return  # a scan that began after this read arrived has indexed it all
            began = time.monotonic()
            starts = self._starts.setdefault(partition, {})
            indexed = self._indexed.get(partition, 0)
            reached = indexed

            def index(record: Any) -> None:
                nonlocal reached
                if record.key is not None:
                    starts.setdefault(record.key, record.offset)
                reached = max(reached, record.offset + 1)

            try:
                await self._scan(lambda _: False, [partition], start=indexed, seen=index)
            except _Rewound:  # a broker that lost its log (tansu in memory): index afresh
                starts.clear()
                reached = 0
                await self._scan(lambda _: False, [partition], start=0, seen=index)
            self._indexed[partition] = reached
            self._caught_up_at[partition] = began

    async def read_stream(self, stream_id: str) -> list[Envelope[Any]]:
        """A stream's events in version order: the chain its owner wrote."""
        return [event for event, _ in await self.read_chain(stream_id)]

    async def read_chain(self, stream_id: str) -> list[tuple[Envelope[Any], str | None]]:
        """A stream's events in version order (the chain its owner wrote), each with the
        digest of its original payload when its content was erased."""
        key = stream_id.encode()
        partition = await self._partition_of(stream_id)
        await self._catch_up(partition)
        first = self._starts.get(partition, {}).get(key)
        if first is None:
            return []  # the log has no event of this stream
        found = await self._scan(lambda record: record.key == key, [partition], start=first)
        # A producer retry can write an event twice, and a foreign writer can claim a
        # version the owner wrote: the stream is the chain its owner wrote (on_chain).
        kept, foreign = on_chain(found)
        for event in foreign:
            log.warning(
                "stream %s: foreign event %s at version %d ignored (off the chain)",
                stream_id,
                event.event_id,
                event.stream_version,
            )
        return kept

    async def _partition_of(self, stream_id: str) -> int:
        if self._partitions is None:
            consumer = await self._consumer()
            try:
                await consumer.topics()
                self._partitions = sorted(consumer.partitions_for_topic(self._topic) or [])
            finally:
                await consumer.stop()
        if not self._partitions:
            return 0
        return partition_for(stream_id, self._partitions)

    async def read_types(self, types: Collection[str]) -> list[Envelope[Any]]:
        """Every event of the given types, in log order per partition, deduplicated by id."""
        # The type sits near the start of each record: test the bytes before decoding.
        needles = [f'"type":"{t}"'.encode() for t in types]
        found = await self._scan(lambda record: any(n in record.value for n in needles))
        seen: set[str] = set()
        unique = []
        for event, _ in found:
            if event.type in types and event.event_id not in seen:
                seen.add(event.event_id)
                unique.append(event)
        return unique
