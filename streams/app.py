"""The Faust app: thin agents around the pure projectors and detectors.

At-least-once into idempotent sinks: a batch's rows are written before its
events are acknowledged (Faust acks `take_events` batches only after the loop
body finishes), and offsets are committed only for acknowledged events.

One agent reads the event log once and feeds every projection: the archive
(every event, exact bytes), the facts behind conversation memory and analytics,
anomalies and memory prunes. The detectors watch the same events; their findings
are appended to the log as AnomalyDetected events, which come back through the
projector as rows of the `anomalies` table, like every other event.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import faust
from tenacity import AsyncRetrying, before_sleep_log, retry_if_exception_type, wait_exponential

from events import AnomalyDetected, DecodeError, Envelope, MemoryPruned, decode, topics
from events.types import CURRENT_SCHEMA
from streams.archive import archive_row
from streams.detectors import Detectors, Finding
from streams.ports import EventAppender, ProjectionBatch, ProjectionSink
from streams.projections import PruneRow, project, table_of

log = logging.getLogger(__name__)

ARCHIVER_ID = "chatllm-projector"
"""Faust app id and consumer group of the projection processor (a stable name)."""
PROJECTIONS_AGENT = "chatllm.projections"
PROJECTIONS = ("archive", "facts")
"""The projections the agent writes (lag is reported for each)."""

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
    system_tenant: str = "default"
    """The tenant that findings about processes (not about a tenant's traffic) belong to."""
    memory_sample_s: float = 0.0
    """How often to sample process memory for the memory_growth detector (0: never)."""
    memory_max_age_days: float = 30.0
    prune_interval_s: float = 0.0
    """How often to prune conversation memory older than memory_max_age_days (0: never)."""


LagObserver = Callable[[str, float], None]
"""(projection, seconds from the event to its row being written)."""
Pruner = Callable[[datetime], Awaitable[dict[str, int]]]
"""cutoff -> {tenant: memory entries older than it}."""


class ProjectionWorker:
    """Builds the Faust app of the projection processor around its sink.

    `appender`, `new_event_id` and `detectors` together turn on anomaly detection (the
    findings are appended to the log); `memory_probe` returns {process: RSS in MiB};
    `pruner` counts what a memory prune removes.
    """

    def __init__(
        self,
        settings: WorkerSettings,
        sink: ProjectionSink,
        observe_lag: LagObserver | None = None,
        *,
        appender: EventAppender | None = None,
        new_event_id: Callable[[], str] | None = None,
        detectors: Detectors | None = None,
        memory_probe: Callable[[], dict[str, float]] | None = None,
        pruner: Pruner | None = None,
    ) -> None:
        self.settings = settings
        self.sink = sink
        self.observe_lag = observe_lag
        self.appender = appender
        self.new_event_id = new_event_id
        self.detectors = detectors if appender is not None and new_event_id else None
        self.memory_probe = memory_probe
        self.pruner = pruner
        self.written = 0
        self.dead_lettered = 0
        self.findings = 0
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

        async def projections(stream: faust.StreamT[Any]) -> None:
            batches = stream.take_events(s.batch_size, within=s.batch_within_s)  # type: ignore[attr-defined]
            async for batch in batches:
                out = ProjectionBatch()
                decoded_events: list[Envelope[Any]] = []
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
                    decoded_events.append(decoded)
                    out.archive.append(
                        archive_row(
                            decoded,
                            value,
                            topic=message.topic,
                            partition=message.partition,
                            offset=message.offset,
                        )
                    )
                    row = project(decoded)
                    if row is not None:
                        out.rows.setdefault(table_of(row), []).append(row)
                        if isinstance(row, PruneRow):
                            known = out.prunes.get(row.tenant_id)
                            if known is None or row.before > known:
                                out.prunes[row.tenant_id] = row.before
                if out.archive:
                    await self._write(out)
                    await self._detect(decoded_events)

        app.agent(events, name=PROJECTIONS_AGENT)(projections)

        if s.memory_sample_s > 0 and self.memory_probe is not None:
            app.timer(s.memory_sample_s)(self._sample_memory)
        if s.prune_interval_s > 0 and self.pruner is not None:
            app.timer(s.prune_interval_s)(self._scheduled_prune)
        return app

    # ---- anomalies ---------------------------------------------------------------------

    async def _detect(self, events: Sequence[Envelope[Any]]) -> None:
        if self.detectors is None:
            return
        findings = [f for e in events for f in self.detectors.observe(e)]
        await self._report(findings)

    async def _sample_memory(self) -> None:
        if self.detectors is None or self.memory_probe is None:
            return
        now = datetime.now(UTC)
        tenant = self.settings.system_tenant
        samples = await asyncio.to_thread(self.memory_probe)
        findings = [
            f
            for process, rss in sorted(samples.items())
            for f in self.detectors.observe_memory(tenant, process, rss, now)
        ]
        await self._report(findings)

    async def _report(self, findings: Sequence[Finding]) -> None:
        if not findings or self.appender is None or self.new_event_id is None:
            return
        events = [self._envelope(f) for f in findings]
        try:
            await self.appender.append(events)
        except Exception:
            # A finding is derived data: losing one to a broker outage must not stop the
            # projections (it is logged; the next window is judged again).
            log.exception("could not append %d anomaly findings", len(events))
            return
        self.findings += len(events)
        for f in findings:
            log.warning(
                "anomaly %s on %s: %s = %s (threshold %s)",
                f.detector,
                f.subject or f.tenant_id,
                f.metric,
                f.observed,
                f.threshold,
            )

    def _system_envelope(
        self, payload: Any, tenant_id: str, at: datetime, stream: str
    ) -> Envelope[Any]:
        assert self.new_event_id is not None
        event_id = self.new_event_id()
        return Envelope(
            event_id=event_id,
            type=type(payload).__name__,
            schema=CURRENT_SCHEMA[type(payload)],
            occurred_at=at,
            # Each finding / prune is a stream of its own: one writer, version 1, no zombie.
            stream_id=f"{stream}:{event_id}",
            stream_version=1,
            tenant_id=tenant_id,
            user_id=PROJECTIONS_AGENT,
            trace_id=event_id.replace("-", ""),
            span_id=event_id.replace("-", "")[:16],
            correlation_id=event_id,
            payload=payload,
        )

    def _envelope(self, f: Finding) -> Envelope[Any]:
        payload = AnomalyDetected(
            detector=f.detector,
            metric=f.metric,
            observed=f.observed,
            threshold=f.threshold,
            baseline=f.baseline,
            window_s=f.window_s,
            subject=f.subject,
            detail=f.detail,
        )
        return self._system_envelope(payload, f.tenant_id, f.at, "anomaly")

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

    async def _dead_letter(self, message: Any, reason: str) -> None:
        source = f"{message.topic}/{message.partition}/{message.offset}"
        headers = {
            topics.DLQ_REASON: reason.encode(),
            topics.DLQ_SOURCE: source.encode(),
            topics.DLQ_PROCESSOR: PROJECTIONS_AGENT.encode(),
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

    async def _write(self, rows: ProjectionBatch) -> None:
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
                    await self.sink.write(rows)
            if self.observe_lag is not None:
                now = datetime.now(UTC)
                for row in rows.archive:
                    lag = (now - row.occurred_at).total_seconds()
                    for name in PROJECTIONS:
                        self.observe_lag(name, lag)
        except asyncio.CancelledError:
            # Stopping mid-batch: take_events acks the batch on the way out and Faust
            # commits on stop, so the rows must be in the sink first. If they cannot be
            # written now, exit without committing: the events are re-read on restart.
            try:
                await asyncio.wait_for(
                    self.sink.write(rows), timeout=self.settings.stop_write_timeout_s
                )
            except BaseException:
                log.critical("stopping with %d unwritten events: exiting uncommitted", len(rows))
                os._exit(EXIT_UNWRITTEN)
            raise
        self.written += len(rows)
