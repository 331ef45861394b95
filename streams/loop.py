"""The consume loop the stream processors share: a topic read in whole fetched batches by a
consumer group, each batch handled (rows written, events appended) before its offsets are
committed; and the dead-letter topic, where what cannot be handled is kept with its reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from events import topics

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class LoopSettings:
    bootstrap_servers: str
    topic: str
    group: str
    batch_size: int = 1000
    batch_within_s: float = 0.2
    # tansu: group joins take ~half the session timeout, and a lone member waits for the
    # whole rebalance timeout; short values keep start-up and restarts to seconds.
    session_timeout_s: float = 6.0
    heartbeat_interval_s: float = 1.0
    rebalance_timeout_s: float = 3.0
    commit_interval_s: float = 1.0
    """Handled offsets are committed at most this often (a crash re-reads at most that)."""
    fetch_wait_s: float = 0.1
    """How long the broker may hold a fetch for more data (bounds the lag when idle)."""
    start_at_end: bool = False
    """A new group starts at the end of the topic instead of its beginning."""


Handler = Callable[[Sequence[Any]], Awaitable[None]]
"""Handles one fetched batch of records; returns once its effects are durable."""


class DeadLetters:
    """The dead-letter topic: the original record, byte for byte, with why and where from."""

    def __init__(self, bootstrap_servers: str, topic: str, processor: str) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self.processor = processor
        self.count = 0
        self._producer: Any = None

    async def start(self) -> None:
        from aiokafka import AIOKafkaProducer

        if self._producer is None:
            self._producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap_servers, acks="all")
            try:
                await self._producer.start()
            except BaseException:
                producer, self._producer = self._producer, None
                with contextlib.suppress(Exception):
                    await producer.stop()
                raise

    async def stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    async def send(
        self,
        *,
        key: bytes | None,
        value: bytes | None,
        reason: str,
        source: str,
        extra: Sequence[tuple[str, bytes]] = (),
    ) -> None:
        """Keep the record; returns once the broker acknowledged it."""
        await self.start()
        headers = [
            (topics.DLQ_REASON, reason.encode()),
            (topics.DLQ_SOURCE, source.encode()),
            (topics.DLQ_PROCESSOR, self.processor.encode()),
            (topics.DLQ_FAILED_AT, datetime.now(UTC).isoformat().encode()),
            *extra,
        ]
        await self._producer.send_and_wait(self.topic, key=key, value=value, headers=headers)
        self.count += 1
        log.warning("dead-lettered %s: %s", source, reason)

    async def record(self, record: Any, reason: str) -> None:
        """Dead-letter a consumed record (its topic/partition/offset is the source)."""
        await self.send(
            key=record.key,
            value=record.value,
            reason=reason,
            source=f"{record.topic}/{record.partition}/{record.offset}",
        )


class BatchLoop:
    """Consume `settings.topic` as `settings.group`; `handle` each fetched batch, then let
    its offsets move on. At-least-once: a crash re-reads what was not committed."""

    def __init__(self, settings: LoopSettings, handle: Handler) -> None:
        self.settings = settings
        self.handle = handle
        self._consumer: Any = None

    def assignment(self) -> set[tuple[str, int]]:
        """The (topic, partition)s this loop holds now."""
        consumer = self._consumer
        if consumer is None:
            return set()
        return {(tp.topic, tp.partition) for tp in consumer.assignment()}

    async def run(self) -> None:
        from aiokafka import AIOKafkaConsumer
        from aiokafka.errors import CommitFailedError, IllegalStateError

        s = self.settings
        consumer = AIOKafkaConsumer(
            s.topic,
            bootstrap_servers=s.bootstrap_servers,
            group_id=s.group,
            client_id=f"{s.group}-loop",
            enable_auto_commit=False,
            auto_offset_reset="latest" if s.start_at_end else "earliest",
            max_poll_records=s.batch_size,
            fetch_max_wait_ms=int(s.fetch_wait_s * 1000),
            session_timeout_ms=int(s.session_timeout_s * 1000),
            heartbeat_interval_ms=int(s.heartbeat_interval_s * 1000),
            rebalance_timeout_ms=int(s.rebalance_timeout_s * 1000),
        )
        try:
            await consumer.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await consumer.stop()
            raise
        self._consumer = consumer
        handled: dict[Any, int] = {}  # partition -> next offset; handled, not committed
        committed_at = time.monotonic()

        async def commit() -> None:
            nonlocal committed_at
            committed_at = time.monotonic()
            if not handled:
                return
            offsets = dict(handled)
            handled.clear()
            try:
                await consumer.commit(offsets)
            except (CommitFailedError, IllegalStateError) as exc:
                # A rebalance took the partitions away: the new owner re-reads from the
                # last commit, and the idempotent sinks absorb the repeat.
                log.info("offsets not committed (%s); they will be re-read", exc)

        try:
            while True:
                fetched = await consumer.getmany(
                    timeout_ms=int(s.batch_within_s * 1000), max_records=s.batch_size
                )
                if fetched:
                    ends = {tp: batch[-1].offset + 1 for tp, batch in fetched.items()}
                    work = asyncio.ensure_future(
                        self.handle([r for batch in fetched.values() for r in batch])
                    )
                    try:
                        await asyncio.shield(work)
                    except asyncio.CancelledError:
                        # A stop in the middle of a batch lets it finish and commits it:
                        # handlers that already ran must not see its events a second time.
                        with contextlib.suppress(Exception):
                            await work
                        if not work.cancelled() and work.exception() is None:
                            handled.update(ends)
                        raise
                    # Only now, with the batch handled, may its offsets move on.
                    handled.update(ends)
                if time.monotonic() - committed_at >= s.commit_interval_s:
                    await commit()
        except asyncio.CancelledError:
            # A clean stop: what was handled is committed (a crash instead re-reads it).
            with contextlib.suppress(Exception):
                await asyncio.wait_for(commit(), 10)
            raise
        finally:
            self._consumer = None
            with contextlib.suppress(Exception):
                await consumer.stop()


@contextlib.asynccontextmanager
async def running_tasks(
    jobs: Sequence[Awaitable[None]],
) -> Any:
    """Run `jobs` as tasks for the duration of the block; yields the tasks. On exit they
    are cancelled, and the first that had crashed re-raises."""
    tasks = [asyncio.ensure_future(job) for job in jobs]
    try:
        yield tasks
    finally:
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        crashed = [r for r in results if isinstance(r, Exception)]
        if crashed:
            raise crashed[0]


def crashed(task: asyncio.Future[Any] | None) -> BaseException | None:
    """Why a task stopped on its own, if it did."""
    if task is None or not task.done() or task.cancelled():
        return None
    return task.exception()


async def every(interval_s: float, job: Callable[[], Awaitable[None]]) -> None:
    while True:
        await asyncio.sleep(interval_s)
        await job()
