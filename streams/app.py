"""The Faust app: thin agents around the pure projectors.

At-least-once into idempotent sinks: a batch's rows are written before its
events are acknowledged (Faust acks `take_events` batches only after the loop
body finishes), and offsets are committed only for acknowledged events.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faust
from tenacity import AsyncRetrying, before_sleep_log, retry_if_exception_type, wait_exponential

from events import DecodeError, decode, topics
from streams.archive import ArchiveRow, archive_row
from streams.ports import ArchiveSink

log = logging.getLogger(__name__)

ARCHIVER_ID = "chatllm-archiver"
"""Faust app id and consumer group of the archive processor (a stable name)."""
ARCHIVE_AGENT = "chatllm.archive"

EXIT_UNWRITTEN = 75
"""Exit status when stopping with rows the sink never accepted (offsets left uncommitted)."""


@dataclass(frozen=True, kw_only=True)
class WorkerSettings:
    """How a Faust worker talks to the broker; explicit, no globals."""

    bootstrap_servers: str
    datadir: Path
    events_topic: str = topics.EVENTS
    deadletter_topic: str = topics.DEADLETTER
    partitions: int = 4
    app_id: str = ARCHIVER_ID
    batch_size: int = 1000
    batch_within_s: float = 0.2
    # tansu: group joins take ~half the session timeout, and a lone member waits for the
    # whole rebalance timeout; short values keep start-up and restarts to seconds.
    session_timeout_s: float = 6.0
    heartbeat_interval_s: float = 1.0
    rebalance_timeout_s: float = 3.0
    commit_interval_s: float = 1.0
    stop_write_timeout_s: float = 10.0


class ArchiveWorker:
    """Builds the Faust app of the archive processor around a sink."""

    def __init__(
        self,
        settings: WorkerSettings,
        sink: ArchiveSink,
        observe_lag: Callable[[float], None] | None = None,
    ) -> None:
        """`observe_lag` receives, per written row, the seconds from its event to the write."""
        self.settings = settings
        self.sink = sink
        self.observe_lag = observe_lag
        self.written = 0
        self.dead_lettered = 0
        self.app = self._build()

    def _build(self) -> faust.App:
        s = self.settings
        s.datadir.mkdir(parents=True, exist_ok=True)
        app = faust.App(
            s.app_id,
            broker=[f"kafka://{server}" for server in s.bootstrap_servers.split(",")],
            datadir=str(s.datadir),
            store="memory://",
            web_enabled=False,
            # Kafka transactions are not honoured by tansu: never rely on them.
            processing_guarantee="at_least_once",
            topic_disable_leader=True,
            topic_allow_declare=True,
            topic_partitions=s.partitions,
            consumer_auto_offset_reset="earliest",
            broker_session_timeout=s.session_timeout_s,
            broker_heartbeat_interval=s.heartbeat_interval_s,
            broker_rebalance_timeout=s.rebalance_timeout_s,
            broker_commit_interval=s.commit_interval_s,
            producer_acks=-1,
        )
        events = app.topic(
            s.events_topic,
            key_serializer="raw",
            value_serializer="raw",
            partitions=s.partitions,
        )
        self._dlq = app.topic(s.deadletter_topic, key_serializer="raw", value_serializer="raw")

        async def archive(stream: faust.StreamT[Any]) -> None:
            batches = stream.take_events(s.batch_size, within=s.batch_within_s)  # type: ignore[attr-defined]
            async for batch in batches:
                rows: list[ArchiveRow] = []
                for event in batch:
                    message = event.message
                    value: bytes | None = message.value
                    try:
                        if not value:
                            raise DecodeError("empty record (no value)")
                        decoded = decode(value)
                    except DecodeError as exc:
                        await self._dead_letter(message, exc.reason)
                        continue
                    rows.append(
                        archive_row(
                            decoded,
                            value,
                            topic=message.topic,
                            partition=message.partition,
                            offset=message.offset,
                        )
                    )
                if rows:
                    await self._write(rows)

        app.agent(events, name=ARCHIVE_AGENT)(archive)
        return app

    async def _dead_letter(self, message: Any, reason: str) -> None:
        source = f"{message.topic}/{message.partition}/{message.offset}"
        headers = {
            topics.DLQ_REASON: reason.encode(),
            topics.DLQ_SOURCE: source.encode(),
            topics.DLQ_PROCESSOR: ARCHIVE_AGENT.encode(),
            topics.DLQ_FAILED_AT: datetime.now(UTC).isoformat().encode(),
        }
        # force=True sends now instead of when the event is acked; awaiting the future
        # waits for the broker's ack, so the original is kept before its offset moves on.
        pending = await self._dlq.send(
            key=message.key, value=message.value, headers=headers, force=True
        )
        await pending
        self.dead_lettered += 1
        log.warning("dead-lettered %s: %s", source, reason)

    async def _write(self, rows: Sequence[ArchiveRow]) -> None:
        # A sink outage blocks the agent (lag grows) rather than losing rows; the
        # events of this batch stay unacknowledged until the write succeeds.
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(Exception),
                wait=wait_exponential(multiplier=0.1, max=5.0),
                before_sleep=before_sleep_log(log, logging.WARNING),
                reraise=True,
            ):
                with attempt:
                    await self.sink.write_archive(rows)
            if self.observe_lag is not None:
                now = datetime.now(UTC)
                for row in rows:
                    self.observe_lag((now - row.occurred_at).total_seconds())
        except asyncio.CancelledError:
            # Stopping mid-batch: take_events acks the batch on the way out and Faust
            # commits on stop, so the rows must be in the sink first. If they cannot be
            # written now, exit without committing: the events are re-read on restart.
            try:
                await asyncio.wait_for(
                    self.sink.write_archive(rows), timeout=self.settings.stop_write_timeout_s
                )
            except BaseException:
                log.critical(
                    "stopping with %d unwritten archive rows: exiting uncommitted", len(rows)
                )
                os._exit(EXIT_UNWRITTEN)
            raise
        self.written += len(rows)
