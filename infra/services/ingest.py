"""Ingest over HTTP and the dead-letter topic for operators.

`POST /v1/events` checks each event at once (so the caller learns what was wrong), puts the
valid ones on the ingest topic, where the projection worker validates and appends them to
the log like any upstream record, and dead-letters the rest with the reason. The
dead-letter topic can be listed, shown and re-driven (to the ingest topic).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from events import DecodeError, topics
from infra.adapters.kafka.clients import LogUnavailable, new_consumer, new_producer
from infra.config import Settings
from streams.ingest import TENANT_HEADER, tenant_hint, validate
from streams.loop import DeadLetters

HTTP_PROCESSOR = "http.ingest"


class Rejected(msgspec.Struct, frozen=True):
    index: int
    event_id: str
    reason: str


class IngestResult(msgspec.Struct, frozen=True):
    accepted: int
    rejected: list[Rejected]


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    partition: int
    offset: int
    reason: str
    source: str
    processor: str
    failed_at: str
    tenant: str
    key: str | None
    value: str | None
    """The original bytes as text (UTF-8, invalid bytes replaced)."""


class _Id(msgspec.Struct):
    event_id: str = ""


_id_decoder = msgspec.json.Decoder(_Id)


class Ingest:
    """The API process's side of ingest: its producer and its view of the dead letters."""

    def __init__(self, settings: Settings, bootstrap_servers: str) -> None:
        self.settings = settings
        self.bootstrap_servers = bootstrap_servers
        self.timeout_s = settings.broker.delivery_timeout_ms / 1000
        self.dead_letters = DeadLetters(
            bootstrap_servers, settings.topics.deadletter, HTTP_PROCESSOR
        )
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()

    async def _started(self) -> AIOKafkaProducer:
        async with self._lock:
            if self._producer is None:
                producer = new_producer(
                    bootstrap_servers=self.bootstrap_servers,
                    acks="all",
                    max_request_size=self.settings.broker.max_request_bytes,
                )
                await producer.start()
                self._producer = producer
            return self._producer

    async def stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(Exception):
                await producer.stop()
        await self.dead_letters.stop()

    async def submit(
        self, records: Sequence[bytes], tenant_id: str, sources: Sequence[str] = ()
    ) -> IngestResult:
        """Check each record as an event of `tenant_id`; queue the valid ones for the log,
        dead-letter the others with why (their source: `sources[i]`, or `http/i`). Returns
        once the broker acknowledged all of it."""
        prefixes = self.settings.ingest.stream_prefixes
        types = self.settings.ingest.allowed_types
        max_bytes = self.settings.broker.max_record_bytes
        valid: list[tuple[bytes, str]] = []
        rejected: list[Rejected] = []
        for index, value in enumerate(records):
            try:
                event = validate(value, prefixes, types, max_bytes)
                if event.tenant_id != tenant_id:
                    raise DecodeError(
                        f"tenant_id {event.tenant_id!r} is not the caller's tenant {tenant_id!r}"
                    )
                valid.append((value, event.stream_id))
            except DecodeError as exc:
                rejected.append(Rejected(index, _event_id(value), exc.reason))
                await self.dead_letters.send(
                    key=None,
                    value=value,
                    reason=exc.reason,
                    source=sources[index] if index < len(sources) else f"http/{index}",
                    extra=[(TENANT_HEADER, tenant_id.encode())],
                )
        try:
            producer = await self._started()
            pending = [
                await producer.send(self.settings.topics.ingest, value=value, key=stream.encode())
                for value, stream in valid
            ]
            await asyncio.wait_for(asyncio.gather(*pending), self.timeout_s)
        except Exception as exc:
            raise LogUnavailable(f"the ingest topic did not acknowledge: {exc!r}") from exc
        return IngestResult(accepted=len(valid), rejected=rejected)

    # ---- dead letters -------------------------------------------------------------------

    async def _read_dead_letters(self) -> list[Any]:
        consumer = new_consumer(
            bootstrap_servers=self.bootstrap_servers,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=50,
        )
        await consumer.start()
        try:
            topic = self.settings.topics.deadletter
            parts = [TopicPartition(topic, p) for p in await _partitions(consumer, topic)]
            consumer.assign(parts)
            await consumer.seek_to_beginning(*parts)
            # tansu's end offsets are not reliable: read until a poll brings nothing new.
            found: list[Any] = []
            while True:
                batch = await consumer.getmany(timeout_ms=300, max_records=5000)
                if not batch:
                    break
                for records in batch.values():
                    found.extend(records)
            return sorted(found, key=lambda r: (r.timestamp, r.partition, r.offset))
        finally:
            await consumer.stop()

    async def list(self, tenant_id: str, *, include_unowned: bool) -> list[DeadLetter]:
        """Dead letters of the tenant (and, where allowed, those naming no tenant)."""
        out = []
        for record in await self._read_dead_letters():
            letter = _letter(record)
            if letter.tenant == tenant_id or (include_unowned and not letter.tenant):
                out.append(letter)
        return out

    async def retry(
        self, tenant_id: str, partition: int, offset: int, *, include_unowned: bool
    ) -> IngestResult:
        """Re-drive one dead letter: its original bytes go through ingest again."""
        for letter in await self.list(tenant_id, include_unowned=include_unowned):
            if (letter.partition, letter.offset) == (partition, offset):
                if letter.value is None:
                    raise LookupError(f"dead letter {partition}/{offset} has no value to retry")
                # Dead-lettered again, it keeps where it first came from, and says it was
                # a retry of this letter.
                source = f"{letter.source or 'unknown'} (retry of dlq {partition}/{offset})"
                return await self.submit([letter.value.encode()], tenant_id, [source])
        raise LookupError(f"no dead letter {partition}/{offset} of this tenant")


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> list[int]:
    for _ in range(50):
        found = consumer.partitions_for_topic(topic)
        if found:
            return sorted(found)
        await consumer.topics()  # refresh the metadata
        await asyncio.sleep(0.1)
    raise LookupError(f"topic {topic!r} does not exist")


def _event_id(value: bytes) -> str:
    try:
        return _id_decoder.decode(value).event_id
    except (msgspec.DecodeError, msgspec.ValidationError):
        return ""


def _letter(record: Any) -> DeadLetter:
    headers = {k: v.decode("utf-8", "replace") for k, v in (record.headers or ())}
    tenant = headers.get(TENANT_HEADER) or tenant_hint(record.value)
    return DeadLetter(
        partition=record.partition,
        offset=record.offset,
        reason=headers.get(topics.DLQ_REASON, ""),
        source=headers.get(topics.DLQ_SOURCE, ""),
        processor=headers.get(topics.DLQ_PROCESSOR, ""),
        failed_at=headers.get(topics.DLQ_FAILED_AT, ""),
        tenant=tenant,
        key=record.key.decode("utf-8", "replace") if record.key is not None else None,
        value=record.value.decode("utf-8", "replace") if record.value is not None else None,
    )
