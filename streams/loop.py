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
    fetch_wait_s: float = 0.5
    """How long the broker may hold a fetch for more data (bounds the lag when idle)."""
    fetch_min_bytes: int = 1_048_576
    """How much a fetch waits for (up to fetch_wait_s): fewer, fuller fetches. The embedded
    broker scans its in-memory log on every fetch, so back-to-back small fetches made its CPU
    per turn grow with the log (0.25 -> 13 ms after 100,000 turns)."""
    start_at_end: bool = False
    """A new group starts at the end of the topic instead of its beginning."""
    finish_timeout_s: float = 10.0
    """On a stop, how long a batch already being handled may take to finish (and be
    committed); past that it is abandoned uncommitted, and re-read by the next owner."""
    stuck_after_s: float = 30.0
    """A batch handled for longer than this makes the loop's health say it is stuck."""


@dataclass
class LoopHealth:
    """What a consume loop is doing, for /healthz: its lag, and whether it is stuck."""

    name: str
    running: bool = False
    lag: int | None = None
    """Records on its partitions not handled yet (None until the broker has said)."""
    handling_since: float | None = None
    """time.monotonic() when the batch in hand was fetched; None between batches."""
    last_error: str = ""
    """The last error a handler reported while retrying; cleared when a batch is done."""
    stopped: str = ""
    """Why the loop stopped on its own (it crashed), if it did."""
    stuck_after_s: float = 30.0

    def report(self, now: float | None = None) -> dict[str, Any]:
        now = time.monotonic() if now is None else now
        busy = 0.0 if self.handling_since is None else now - self.handling_since
        stuck = bool(self.stopped) or busy > self.stuck_after_s
        why = self.stopped
        if stuck and not why:
            why = f"one batch in hand for {busy:.0f} s"
            if self.last_error:
                why += f": {self.last_error}"
        return {
            "status": "stuck" if stuck else ("ok" if self.running else "starting"),
            "lag": self.lag,
            "busy_s": round(busy, 1),
            "last_error": self.last_error,
            "reason": why,
        }


MAX_DEAD_LETTER_BYTES = 16 * 1024 * 1024
TRUNCATED_BYTES = 64 * 1024
"""What is kept of a dead letter the broker refuses whole."""

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
            self._producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap_servers,
                acks="all",
                # A dead letter may be larger than what the log takes (that can be why it is
                # one); the broker's own limit decides, and send() copes with a refusal.
                max_request_size=MAX_DEAD_LETTER_BYTES,
            )
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
        try:
            await self._producer.send_and_wait(self.topic, key=key, value=value, headers=headers)
        except Exception as exc:
            if type(exc).__name__ != "MessageSizeTooLargeError" or not value:
                raise
            # The broker will not keep the record whole: keep its head, its size and its
            # digest, so it is still seen, counted and identifiable (never silently gone).
            import hashlib

            headers += [
                (topics.DLQ_TRUNCATED, str(len(value)).encode()),
                (topics.DLQ_SHA256, hashlib.sha256(value).hexdigest().encode()),
            ]
            value = value[:TRUNCATED_BYTES]
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
    its offsets move on. At-least-once: a crash re-reads what was not committed. Long as a
    class: gather, hand over, commit and stop are its steps, each a short method."""

    def __init__(
        self, settings: LoopSettings, handle: Handler, early: Handler | None = None
    ) -> None:
        """`early`, when given, sees each batch as soon as it is gathered, while the batch
        before it is still being handled: the next batch is gathered (and shown to `early`)
        during `handle`, which still takes the batches one at a time and in order. What
        `early` does for a batch that is then not handled (a stop, a crash) happens again
        when the batch is read again: it must be safe to repeat."""
        self.settings = settings
        self.handle = handle
        self.early = early
        self._consumer: Any = None
        self.health = LoopHealth(settings.group, stuck_after_s=settings.stuck_after_s)
        self.caught_up_at = 0.0
        """time.time() before which every record the broker acknowledged has been handled
        (wall time: other processes ask). Set from the fetch responses that left nothing
        behind, never from when getmany was called: aiokafka prefetches, and an empty
        getmany says nothing about records that arrived while a fetch was held."""

    async def settled(self, since: float, timeout_s: float) -> bool:
        """Wait until everything acknowledged before `since` (time.time()) is handled; False
        if that took longer than `timeout_s` (read-your-writes for the projections)."""
        deadline = time.monotonic() + timeout_s
        while self.caught_up_at < since:
            if time.monotonic() >= deadline or self.health.stopped:
                return False
            await asyncio.sleep(0.01)
        return True

    async def _gather(self, consumer: Any) -> dict[Any, list[Any]]:
        s = self.settings
        return await _gather_batch(consumer, s.batch_size, s.batch_within_s)

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
            fetch_min_bytes=s.fetch_min_bytes,
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
        health = self.health
        health.running, health.stopped = True, ""
        handled: dict[Any, int] = {}  # partition -> next offset; handled, not committed
        positions: dict[Any, int] = {}  # partition -> next offset to handle
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

        early = self.early

        async def gather() -> tuple[dict[Any, list[Any]], list[Any]]:
            fetched = await self._gather(consumer)
            records = [r for batch in fetched.values() for r in batch]
            if records and early is not None:
                await early(records)
            return fetched, records

        async def gather_during(
            work: asyncio.Future[None],
        ) -> tuple[dict[Any, list[Any]], list[Any]]:
            # An empty gather returns within the batch window: poll again while the batch
            # before is handled, then hand back (empty or not) for the loop's bookkeeping.
            while True:
                fetched, records = await gather()
                if fetched or work.done():
                    return fetched, records

        ahead: asyncio.Future[tuple[dict[Any, list[Any]], list[Any]]] | None = None
        try:
            while True:
                if ahead is None:
                    fetched, records = await gather()
                else:
                    fetched, records = await ahead
                    ahead = None
                if fetched:
                    ends = {tp: batch[-1].offset + 1 for tp, batch in fetched.items()}
                    health.handling_since = time.monotonic()
                    work = asyncio.ensure_future(self.handle(records))
                    if early is not None:
                        ahead = asyncio.ensure_future(gather_during(work))
                    try:
                        await asyncio.shield(work)
                    except asyncio.CancelledError:
                        # A stop in the middle of a batch lets it finish and commits it:
                        # handlers that already ran must not see its events a second time.
                        # A batch that cannot finish (its sink is down) is abandoned
                        # uncommitted after a bound: the stop must not hang on it.
                        with contextlib.suppress(Exception, asyncio.CancelledError):
                            await asyncio.wait_for(work, s.finish_timeout_s)
                        if work.done() and not work.cancelled() and work.exception() is None:
                            handled.update(ends)
                        raise
                    # Only now, with the batch handled, may its offsets move on.
                    handled.update(ends)
                    positions.update(ends)
                    health.handling_since, health.last_error = None, ""
                health.lag = _lag(consumer, positions)
                if health.lag == 0:
                    self.caught_up_at = max(self.caught_up_at, _heard_at(consumer, s))
                if time.monotonic() - committed_at >= s.commit_interval_s:
                    await commit()
        except asyncio.CancelledError:
            # A clean stop: what was handled is committed (a crash instead re-reads it).
            with contextlib.suppress(Exception):
                await asyncio.wait_for(commit(), 10)
            raise
        except BaseException as exc:
            health.stopped = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            if ahead is not None:
                ahead.cancel()
                with contextlib.suppress(BaseException):
                    await ahead
            self._consumer = None
            health.running, health.handling_since = False, None
            with contextlib.suppress(Exception):
                await consumer.stop()


async def _gather_batch(consumer: Any, size: int, window_s: float) -> dict[Any, list[Any]]:
    """One batch: what arrives from the first record on, for `window_s` or until `size`
    records, whichever comes first (never just what one fetch returned: every batch costs
    its sinks a fixed price)."""
    gathered: dict[Any, list[Any]] = {}
    count = 0
    closes: float | None = None
    while True:
        now = time.monotonic()
        wait = window_s if closes is None else closes - now
        if closes is not None and wait <= 0:
            return gathered
        got = await consumer.getmany(timeout_ms=max(1, int(wait * 1000)), max_records=size - count)
        for tp, records in got.items():
            gathered.setdefault(tp, []).extend(records)
            count += len(records)
        if not gathered or count >= size:
            return gathered
        if closes is None:
            closes = time.monotonic() + window_s


def _heard_at(consumer: Any, s: LoopSettings) -> float:
    """The time the broker's view in the last fetch responses is at least as new as: the
    oldest partition's last response, less how long the broker may have held that fetch
    (its highwater may be from the fetch's start). 0 until every partition was heard of."""
    polled = [consumer.last_poll_timestamp(tp) for tp in consumer.assignment()]
    if not polled or any(p is None for p in polled):
        return 0.0
    return min(polled) / 1000 - s.fetch_wait_s


def _lag(consumer: Any, positions: dict[Any, int]) -> int | None:
    """Records on the consumer's partitions past what was handled (from the high
    watermarks of the last fetches); None until every partition has been heard of."""
    total = 0
    assigned = consumer.assignment()
    if not assigned:
        return None  # not in the group yet (or between rebalances): nothing is known
    for tp in assigned:
        high = consumer.highwater(tp)
        if high is None:
            return None
        total += max(0, high - positions.get(tp, high))
    return total


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
