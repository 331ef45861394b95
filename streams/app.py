"""The projection worker: a thin loop around the pure projectors and detectors.

It consumes the event log in whole fetched batches (aiokafka, a consumer group:
several workers share the partitions). It began as a Faust agent; Faust's
per-message stream path cost ~250 us per event here and capped the projections
at ~3k events/s, so the loop takes the fetched batches as they are.

At-least-once into idempotent sinks: a batch's rows are written before its
offsets are committed (by hand, after the write), so a crash at any point
re-reads at most the batches it had not committed.

One loop reads the event log once and feeds every projection: the archive
(every event, exact bytes), the facts behind conversation memory and analytics,
anomalies and memory prunes. For the stateful detectors it derives one compact
observation per finished turn and limiter decision and publishes them in batches to
their own topic; the Faust processors (infra/services/processors.py) judge them with their state
in changelog-backed tables and append their findings to the log as AnomalyDetected
events, which come back through the projector as rows of the `anomalies` table.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    before_sleep_log,
    retry_if_exception_type,
    wait_exponential,
)

from events import DecodeError, Envelope, MemoryPruned, decode, topics
from events.observations import Observation, encode_batch, keyed
from events.standalone import standalone
from streams.archive import archive_row
from streams.detectors import memory_observation, observations_of
from streams.ingest import (
    DEFAULT_MAX_BYTES,
    DEFAULT_PREFIXES,
    DEFAULT_TYPES,
    TENANT_HEADER,
    tenant_hint,
    validate,
)
from streams.loop import (
    BatchLoop,
    DeadLetters,
    LoopHealth,
    LoopSettings,
    crashed,
    every,
    running_tasks,
)
from streams.ports import EventAppender, ObservationSink, ProjectionBatch, ProjectionSink
from streams.projections import PruneRow, project, table_of

log = logging.getLogger(__name__)

ARCHIVER_ID = "chatllm-projector"
"""The consumer group of the projection workers (a stable name)."""
PROJECTIONS_AGENT = "chatllm.projections"
INGEST_AGENT = "chatllm.ingest"
PROJECTIONS = ("archive", "facts")
"""The projections the loop writes (lag is reported for each)."""


@dataclass(frozen=True, kw_only=True)
class WorkerSettings:
    """How a projection worker talks to the broker; explicit, no globals."""

    bootstrap_servers: str
    events_topic: str = topics.EVENTS
    deadletter_topic: str = topics.DEADLETTER
    ingest_topic: str = topics.INGEST
    """Where upstream systems produce; validated, then appended to the log ('' = off)."""
    ingest_prefixes: tuple[str, ...] = DEFAULT_PREFIXES
    ingest_types: tuple[str, ...] = DEFAULT_TYPES
    """The event types upstream systems may produce."""
    max_record_bytes: int = DEFAULT_MAX_BYTES
    """Larger upstream records are dead letters: the log would refuse them forever."""
    max_append_attempts: int = 20
    """Tries to append a valid upstream batch before its events are dead-lettered."""
    app_id: str = ARCHIVER_ID
    """The consumer group."""
    batch_size: int = 1000
    batch_within_s: float = 0.2
    # tansu: group joins take ~half the session timeout, and a lone member waits for the
    # whole rebalance timeout; short values keep start-up and restarts to seconds.
    session_timeout_s: float = 6.0
    heartbeat_interval_s: float = 1.0
    rebalance_timeout_s: float = 3.0
    commit_interval_s: float = 1.0
    """Written offsets are committed at most this often (a crash re-reads at most that)."""
    fetch_wait_s: float = 0.5
    """How long the broker may hold a fetch for more data (bounds the lag when idle)."""
    fetch_min_bytes: int = 1_048_576
    """How much a fetch waits for (up to fetch_wait_s): fewer, fuller fetches. The embedded
    broker scans its in-memory log on every fetch, so back-to-back small fetches made its CPU
    per turn grow with the log (0.25 -> 13 ms after 100,000 turns)."""
    finish_timeout_s: float = 10.0
    """On a stop, how long a batch in hand may take to finish before it is abandoned."""
    stuck_after_s: float = 30.0
    """A batch in hand for longer than this makes health say the loop is stuck."""
    system_tenant: str = "default"
    """The tenant that findings about processes (not about a tenant's traffic) belong to."""
    memory_sample_s: float = 0.0
    """How often to sample process memory for the memory_growth detector (0: never)."""
    memory_max_age_days: float = 30.0
    prune_interval_s: float = 0.0
    """How often to prune conversation memory older than memory_max_age_days (0: never)."""

    def loop(self, topic: str, group: str) -> LoopSettings:
        """The consume loop's settings: its tuning fields come from these, by name."""
        tuning = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(LoopSettings)
            if f.name not in ("topic", "group", "start_at_end")
        }
        return LoopSettings(topic=topic, group=group, **tuning)


LagObserver = Callable[[tuple[str, ...], list[float]], None]
"""Takes a written batch's processors and the lags of its events."""
"""(projection, seconds from the event to its row being written)."""
Pruner = Callable[[datetime], Awaitable[dict[str, int]]]
"""cutoff -> {tenant: memory entries older than it}."""


class ProjectionWorker:
    """The projection processor around its sink (run it with `async with w.running()`). Long
    as a class: a batch's steps (decode, archive, project, observe, dead-letter) are its
    methods, each short.

    `observations` publishes what the stateful detectors judge (turns, limit decisions and,
    with `rss_probe` returning {process: RSS in MiB}, memory samples); `appender` and
    `new_event_id` append the worker's own events (ingest, memory prunes); `pruner` counts
    what a memory prune removes.
    """

    def __init__(
        self,
        settings: WorkerSettings,
        sink: ProjectionSink,
        observe_lag: LagObserver | None = None,
        *,
        appender: EventAppender | None = None,
        new_event_id: Callable[[], str] | None = None,
        observations: ObservationSink | None = None,
        rss_probe: Callable[[], dict[str, float]] | None = None,
        pruner: Pruner | None = None,
    ) -> None:
        self.settings = settings
        self.sink = sink
        self.observe_lag = observe_lag
        self.appender = appender
        self.new_event_id = new_event_id
        self.observations = observations
        self.rss_probe = rss_probe
        self.pruner = pruner
        self.written = 0
        self.observed = 0
        self.observations_lost = 0
        self.dead_letters = DeadLetters(
            settings.bootstrap_servers, settings.deadletter_topic, PROJECTIONS_AGENT
        )
        self._loop = BatchLoop(
            settings.loop(settings.events_topic, settings.app_id), self._handle, early=self._early
        )
        self._prepared: dict[int, tuple[Sequence[Any], ProjectionBatch]] = {}
        """Batches `_early` decoded and observed, by id, for `_handle` to write."""
        self.ingested = 0
        self.ingest_dead_letters = DeadLetters(
            settings.bootstrap_servers, settings.deadletter_topic, INGEST_AGENT
        )
        self._ingest = BatchLoop(
            settings.loop(settings.ingest_topic, f"{settings.app_id}-ingest"), self._ingest_batch
        )
        self._loop_task: asyncio.Future[None] | None = None

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[ProjectionWorker]:
        """Run the projection loop (and the memory sampler and pruner, when configured) on
        the running loop for the duration of the block; a loop that crashed re-raises."""
        s = self.settings
        jobs = [self._loop.run()]
        if s.ingest_topic and self.appender is not None:
            jobs.append(self._ingest.run())
        if s.memory_sample_s > 0 and self.rss_probe is not None and self.observations:
            jobs.append(every(s.memory_sample_s, self._sample_memory))
        if s.prune_interval_s > 0 and self.pruner is not None:
            jobs.append(every(s.prune_interval_s, self._scheduled_prune))
        try:
            async with running_tasks(jobs) as tasks:
                self._loop_task = tasks[0]
                yield self
        finally:
            await self.dead_letters.stop()
            await self.ingest_dead_letters.stop()
            if self.observations is not None:
                await self.observations.stop()

    @property
    def failed(self) -> BaseException | None:
        """Why the projection loop stopped on its own, if it did."""
        return crashed(self._loop_task)

    @property
    def dead_lettered(self) -> int:
        return self.dead_letters.count + self.ingest_dead_letters.count

    async def settled(self, since: float, timeout_s: float = 3.0) -> bool:
        """Whether every event acknowledged before `since` (time.time()) is in the
        projections, waiting up to `timeout_s` for it (read-your-writes for the read side)."""
        return await self._loop.settled(since, timeout_s)

    def health(self) -> dict[str, LoopHealth]:
        """The consume loops of this worker, by name (for /healthz)."""
        loops = {"archive": self._loop.health}
        if self.settings.ingest_topic and self.appender is not None:
            loops["ingest"] = self._ingest.health
        return loops

    def assignment(self) -> set[tuple[str, int]]:
        """The (topic, partition)s this worker holds now."""
        return self._loop.assignment()

    # ---- observations for the stateful detectors ------------------------------------------

    async def _observe(self, events: Sequence[Envelope[Any]]) -> None:
        if self.observations is None:
            return
        await self._publish([o for e in events for o in observations_of(e)])

    async def _sample_memory(self) -> None:
        if self.observations is None or self.rss_probe is None:
            return
        now = datetime.now(UTC)
        tenant = self.settings.system_tenant
        samples = await asyncio.to_thread(self.rss_probe)
        await self._publish(
            [memory_observation(tenant, p, rss, now) for p, rss in sorted(samples.items())]
        )

    async def _publish(self, observations: list[Observation]) -> None:
        """One record per detector key, every key of the batch in one send."""
        if not observations or self.observations is None:
            return
        records = [(key, encode_batch(batch)) for key, batch in keyed(observations).items()]
        try:
            await self.observations.publish(records)
        except Exception:
            # Observations are derived data: a broker outage must not stop the projections.
            # The loss is counted (and shown at /v1/live) and logged, never silent.
            self.observations_lost += len(observations)
            log.exception("could not publish %d observations", len(observations))
            return
        self.observed += len(observations)

    def _system_envelope(
        self, payload: Any, tenant_id: str, at: datetime, stream: str
    ) -> Envelope[Any]:
        assert self.new_event_id is not None
        return standalone(
            payload,
            event_id=self.new_event_id(),
            tenant_id=tenant_id,
            user_id=PROJECTIONS_AGENT,
            occurred_at=at,
            stream=stream,
        )

    # ---- memory pruning ------------------------------------------------------------------

    async def prune(
        self,
        *,
        max_age_days: float | None = None,
        requested_by: str = "schedule",
        tenant: str | None = None,
        now: datetime | None = None,
    ) -> dict[str, int]:
        """Append a MemoryPruned event per tenant with memory older than the age; the
        projector applies it (the prune is in the log, not a silent delete)."""
        if self.pruner is None or self.appender is None or self.new_event_id is None:
            raise RuntimeError("pruning needs a pruner, an appender and an id source")
        age = max_age_days or self.settings.memory_max_age_days
        now = now or datetime.now(UTC)
        cutoff = now - timedelta(days=age)
        counts = await self.pruner(cutoff)
        if tenant is not None:
            counts = {tenant: counts.get(tenant, 0)}
        events = [
            self._system_envelope(
                MemoryPruned(
                    before=cutoff, max_age_days=age, entries=entries, requested_by=requested_by
                ),
                name,
                now,
                "memory-prune",
            )
            for name, entries in sorted(counts.items())
            if entries or tenant is not None
        ]
        if events:
            await self.appender.append(events)
        return {e.tenant_id: e.payload.entries for e in events}

    async def _scheduled_prune(self) -> None:
        try:
            pruned = await self.prune()
        except Exception:
            log.exception("scheduled memory prune failed; it runs again next interval")
            return
        if pruned:
            log.info("pruned conversation memory: %s", pruned)

    # ---- ingest ---------------------------------------------------------------------------

    async def _ingest_batch(self, records: Sequence[Any]) -> None:
        """Validate upstream records; append the events to the log, dead-letter the rest.
        An event_id sent twice is appended twice and stored once (the sinks dedup by it)."""
        s = self.settings
        valid: list[tuple[Any, Envelope[Any]]] = []
        for record in records:
            try:
                event = validate(
                    record.value, s.ingest_prefixes, s.ingest_types, s.max_record_bytes
                )
            except DecodeError as exc:
                await self._ingest_dead_letter(record, exc.reason)
                continue
            valid.append((record, event))
        if not valid:
            return
        try:
            await self._append_retrying([e for _, e in valid], self._ingest.health)
        except _Refused as exc:
            if not exc.final:  # the log kept failing: the batch waits in the dead letters
                for record, _ in valid:
                    await self._ingest_dead_letter(record, f"not appended: {exc}")
                return
            # Something in the batch can never be appended: one by one, so that only what
            # the log refuses becomes a dead letter and the rest goes on.
            for record, event in valid:
                try:
                    await self._append_retrying([event], self._ingest.health)
                except _Refused as exc:
                    await self._ingest_dead_letter(record, f"the log refused it: {exc}")
                    continue
                self.ingested += 1
            return
        self.ingested += len(valid)

    async def _ingest_dead_letter(self, record: Any, reason: str) -> None:
        await self.ingest_dead_letters.send(
            key=record.key,
            value=record.value,
            reason=reason,
            source=f"{record.topic}/{record.partition}/{record.offset}",
            extra=[(TENANT_HEADER, tenant_hint(record.value).encode())],
        )

    async def _append_retrying(self, events: Sequence[Envelope[Any]], health: LoopHealth) -> None:
        """Append, retrying what may pass later (the log is down: the batch stays uncommitted
        and health shows the error) up to max_append_attempts; _Refused for what never will
        (too large, refused by the broker) or what still failed after the last attempt."""
        assert self.appender is not None
        attempts = self.settings.max_append_attempts
        for attempt in range(1, attempts + 1):
            try:
                await self.appender.append(events)
                return
            except Exception as exc:
                if not _retriable(exc) or attempt == attempts:
                    raise _Refused(_reason(exc, attempt), final=not _retriable(exc)) from exc
                health.last_error = _reason(exc, attempt)
                log.warning("append of %d upstream events failed: %s", len(events), exc)
                await asyncio.sleep(min(5.0, 0.1 * 2 ** (attempt - 1)))

    # ---- the projection loop ------------------------------------------------------------

    async def _early(self, records: Sequence[Any]) -> None:
        """A batch as soon as it is gathered, while the one before it is being written: it is
        decoded (bad records dead-lettered) and the detectors' observations go out now, so
        the processors' lag does not carry the write before it (a few hundred ms under
        load). A batch that is then not written is read again from its commit, and its
        observations go out again: at least once, as after a crash."""
        out, decoded = await self._project(records)
        if len(self._prepared) > 2:  # left by a loop that stopped before handling them
            self._prepared.clear()
        self._prepared[id(records)] = (records, out)
        if out.archive:
            await self._observe(decoded)

    async def _handle(self, records: Sequence[Any]) -> None:
        prepared = self._prepared.pop(id(records), None)
        if prepared is not None and prepared[0] is records:
            out = prepared[1]
        else:  # not seen early (a loop without the hook)
            out, decoded = await self._project(records)
            if out.archive:
                await self._observe(decoded)
        if out.archive:
            await self._write(out)

    async def _project(self, records: Sequence[Any]) -> tuple[ProjectionBatch, list[Envelope[Any]]]:
        out = ProjectionBatch()
        decoded_events: list[Envelope[Any]] = []
        for record in records:
            value: bytes | None = record.value
            try:
                if not value:
                    raise DecodeError("empty record (no value)")
                decoded = decode(value)
            except DecodeError as exc:
                await self.dead_letters.record(record, exc.reason)
                continue
            decoded_events.append(decoded)
            out.archive.append(
                archive_row(
                    decoded,
                    value,
                    topic=record.topic,
                    partition=record.partition,
                    offset=record.offset,
                )
            )
            row = project(decoded)
            if row is not None:
                out.rows.setdefault(table_of(row), []).append(row)
                if isinstance(row, PruneRow):
                    known = out.prunes.get(row.tenant_id)
                    if known is None or row.before > known:
                        out.prunes[row.tenant_id] = row.before
        return out, decoded_events

    async def _write(self, rows: ProjectionBatch) -> None:
        # A sink outage blocks the loop (lag grows) rather than losing rows; the batch's
        # offsets are committed only after this returns. Stopping mid-write is safe too:
        # nothing was committed, so the batch is read again on restart.
        health = self._loop.health

        def noted(state: RetryCallState) -> None:
            health.last_error = f"writing the projections: {state.outcome.exception()!r}"  # type: ignore[union-attr]
            warn(state)

        warn = before_sleep_log(log, logging.WARNING)
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(Exception),
            wait=wait_exponential(multiplier=0.1, max=5.0),
            before_sleep=noted,
            reraise=True,
        ):
            with attempt:
                await self.sink.write(rows)
        if self.observe_lag is not None:
            now = datetime.now(UTC)
            self.observe_lag(
                tuple(PROJECTIONS),
                [(now - row.occurred_at).total_seconds() for row in rows.archive],
            )
        self.written += len(rows)


class _Refused(Exception):
    """An append that did not pass: `final` when it never will (the log refuses it), else
    the attempts ran out while the log kept failing."""

    def __init__(self, reason: str, *, final: bool) -> None:
        super().__init__(reason)
        self.final = final


_NEVER_PASS = frozenset(
    {
        "MessageSizeTooLargeError",
        "RecordListTooLargeError",
        "InvalidTopicError",
        "TopicAuthorizationFailedError",
        "ClusterAuthorizationFailedError",
        "CorruptRecordException",
    }
)


def _retriable(exc: BaseException) -> bool:
    """Whether an append error may pass later: a broker that is down or slow may come back;
    a record over the size limit, or one the broker refuses outright, never will. Anything
    not known to be final is taken as transient (the attempts bound it)."""
    seen: BaseException | None = exc
    while seen is not None:
        if type(seen).__name__ in _NEVER_PASS:
            return False
        seen = seen.__cause__ or seen.__context__
    return True


def _reason(exc: BaseException, attempt: int) -> str:
    cause = exc.__cause__ or exc
    return f"{type(cause).__name__}: {cause} (attempt {attempt})"
