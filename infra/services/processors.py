"""The stateful stream processors: a Faust app that hosts the anomaly detectors.

The archive writer (streams/app.py) derives compact observations from the log and publishes
them in keyed batches to `topics.observations` (events/observations.py). This app reads that
topic, one agent per detector family, and keeps each family's state in a Faust table backed
by a changelog topic, keyed as the records are (`model:`, `tenant:`, `process:`): a key's
state lives in the processor that owns its partition, comes back from the changelog after a
restart, and moves with its partition on a rebalance. Findings are appended to the event log
as AnomalyDetected events (ids derived from the finding, so a redelivered batch does not
duplicate them); the archive writer projects them like every other event.

The detectors' logic stays pure in streams/detectors.py; Faust only hosts it. The records
are already keyed by each detector's key, so no agent needs `group_by` (a repartition would
cost every record a second trip through the broker).

Run it with `chatllm worker --processors` (several may run: one consumer group); `chatllm up`
starts one as a child process. Each worker writes its status (lag per partition, table
recovery, counts) to `<data dir>/processors/status/<pid>.json` once a second, which the API
reads for /metrics, /v1/live and /healthz.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from events.observations import MODEL, PROCESS, TENANT, Observation, decode_batch
from infra.adapters.kafka.clients import KafkaEventSink, new_consumer
from infra.config import Settings
from streams.detectors import (
    DetectorConfig,
    Finding,
    LatencyState,
    MemoryState,
    TenantRates,
    finding_event,
    observe_latency,
    observe_memory,
    observe_rates,
)
from streams.loop import DeadLetters

log = logging.getLogger(__name__)

PROCESSORS_AGENT = "anomaly-processors"
STATUS_EVERY_S = 1.0
STATUS_STALE_S = 10.0
"""A status file older than this belongs to a worker that stopped."""


def detector_config(settings: Settings) -> DetectorConfig:
    """The detectors' settings: every DetectorConfig field, from the [anomalies] section."""
    a = settings.anomalies
    return DetectorConfig(
        **{f.name: getattr(a, f.name) for f in dataclasses.fields(DetectorConfig)}
    )


def processors_id(settings: Settings) -> str:
    """The Faust app id: its consumer group and the prefix of its changelog topics."""
    return f"chatllm-processors.{settings.topics.events}"


def status_dir(settings: Settings) -> Path:
    return Path(settings.streams.datadir) / "processors" / "status"


async def fetched_highwaters(bootstrap_servers: str, partitions: list[Any]) -> dict[Any, int]:
    """Each partition's end as a fetch reports it (one fetch from each partition's start)."""
    from aiokafka import TopicPartition

    probe = new_consumer(
        bootstrap_servers=bootstrap_servers,
        enable_auto_commit=False,
        fetch_max_wait_ms=10,
        auto_offset_reset="earliest",
    )
    await probe.start()
    try:
        tps = [TopicPartition(tp.topic, tp.partition) for tp in partitions]
        probe.assign(tps)
        await probe.seek_to_beginning(*tps)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            await probe.getmany(timeout_ms=200, max_records=1)
            if all(probe.highwater(tp) is not None for tp in tps):
                break
        ends = {}
        for tp, mine in zip(partitions, tps, strict=True):
            end = probe.highwater(mine)
            if end is not None:
                ends[tp] = end
        return ends
    finally:
        await probe.stop()


def _patch_highwaters() -> None:
    """Faust reads a partition's end from ListOffsets; tansu's answer can lag the log (it
    said 1 for a partition holding 1,000 records written in one batch, measured), and a
    table's recovery that stops early loses state. The end also comes back with every
    fetch: Faust gets the larger of the two."""
    from faust.transport.drivers import aiokafka as driver

    thread = driver.AIOKafkaConsumerThread
    if getattr(thread, "_chatllm_highwaters", False):
        return
    listed = thread._highwaters

    async def _highwaters(self: Any, partitions: list[Any]) -> Mapping[Any, int]:
        ends: dict[Any, int] = dict(await listed(self, partitions))
        if partitions:
            bootstrap = self._ensure_consumer()._client._bootstrap_servers
            for tp, end in (await fetched_highwaters(bootstrap, list(partitions))).items():
                ends[tp] = max(end, ends.get(tp, 0))
        return ends

    setattr(thread, "_highwaters", _highwaters)  # noqa: B010 (a patch of Faust's class)
    setattr(thread, "_chatllm_highwaters", True)  # noqa: B010


def _patch_fetch_wait() -> None:
    """Faust's worker consumer asks for fetches that wait up to 1,500 ms (hard-coded). tansu
    holds such a fetch until the wait is over even when records arrive meanwhile: a record
    reached Faust 0.3 to 1.4 s after it was acknowledged, measured, while with a wait of
    1,000 ms or less it arrives within 2 ms. The app's own wait (`streams.fetch_wait_s`)
    replaces it."""
    from faust.transport.drivers import aiokafka as driver

    thread = driver.AIOKafkaConsumerThread
    if getattr(thread, "_chatllm_fetch_wait", False):
        return
    created = thread._create_worker_consumer

    def _create_worker_consumer(self: Any, transport: Any) -> Any:
        consumer = created(self, transport)
        wait_ms = getattr(self.app, "chatllm_fetch_wait_ms", None)
        if wait_ms is not None:
            consumer._fetch_max_wait_ms = wait_ms  # read when the consumer starts
        return consumer

    setattr(thread, "_create_worker_consumer", _create_worker_consumer)  # noqa: B010
    setattr(thread, "_chatllm_fetch_wait", True)  # noqa: B010


@dataclass
class Counters:
    records: int = 0
    observations: int = 0
    findings: int = 0
    dead_letters: int = 0
    lags: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=20_000))
    """(when, seconds from an observation's event time to its judgement)."""


def _state(raw: Any, kind: type[Any]) -> Any:
    return kind() if raw is None else msgspec.convert(raw, kind)


def build_app(
    settings: Settings, bootstrap_servers: str
) -> tuple[Any, Callable[[], Awaitable[None]]]:
    """The Faust app with its three agents and tables (not started), and what to call when
    it stops."""
    import faust

    _patch_highwaters()
    _patch_fetch_wait()
    s = settings.streams
    datadir = Path(settings.streams.datadir) / "processors" / "faust"
    datadir.parent.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        processors_id(settings),
        broker=[f"kafka://{server}" for server in bootstrap_servers.split(",")],
        store="memory://",
        datadir=str(datadir),
        topic_partitions=settings.topics.partitions,
        topic_replication_factor=1,
        web_enabled=False,
        # tansu: group joins take about half the session timeout, and a lone member waits
        # for the whole rebalance timeout; short values keep starts and handovers quick.
        broker_session_timeout=s.session_timeout_s,
        broker_heartbeat_interval=s.heartbeat_interval_s,
        broker_rebalance_timeout=s.rebalance_timeout_s,
        broker_commit_interval=s.commit_interval_s,
        consumer_auto_offset_reset="earliest",
        stream_recovery_delay=0.0,
        table_standby_replicas=0,
        producer_acks=-1,
    )
    setattr(app, "chatllm_fetch_wait_ms", int(min(s.fetch_wait_s, 1.0) * 1000))  # noqa: B010 (_patch_fetch_wait)
    config = detector_config(settings)
    topic = app.topic(
        settings.topics.observations,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.topics.partitions,
    )
    tables = {
        "latency": app.Table("latency", default=None, partitions=settings.topics.partitions),
        "rates": app.Table("rates", default=None, partitions=settings.topics.partitions),
        "memory": app.Table("memory", default=None, partitions=settings.topics.partitions),
    }
    counters = Counters()
    appender = KafkaEventSink(bootstrap_servers, settings.topics.events, settings.broker)
    dead_letters = DeadLetters(bootstrap_servers, settings.topics.deadletter, PROCESSORS_AGENT)
    families: dict[str, tuple[str, str, type[Any], Any]] = {
        # agent: (key prefix, table, state type, judge)
        "latency": (MODEL, "latency", LatencyState, observe_latency),
        "rates": (TENANT, "rates", TenantRates, observe_rates),
        "memory": (PROCESS, "memory", MemoryState, observe_memory),
    }
    prefixes = tuple(prefix for prefix, *_ in families.values())

    async def report(findings: list[Finding]) -> None:
        if not findings:
            return
        # Retried until the log takes them: the record's offset is committed only after.
        for attempt in range(10):
            try:
                await appender.append([finding_event(f) for f in findings])
                break
            except Exception as exc:
                log.warning("could not append %d findings (%r); retrying", len(findings), exc)
                await asyncio.sleep(min(5.0, 0.2 * 2**attempt))
        else:
            raise RuntimeError(f"the log refused {len(findings)} findings 10 times")
        counters.findings += len(findings)
        for f in findings:
            log.warning(
                "anomaly %s on %s: %s = %s (threshold %s)",
                f.detector,
                f.subject or f.tenant_id,
                f.metric,
                f.observed,
                f.threshold,
            )

    async def dead_letter(event: Any, reason: str) -> None:
        message = event.message
        await dead_letters.send(
            key=message.key,
            value=message.value,
            reason=reason,
            source=f"{message.topic}/{message.partition}/{message.offset}",
        )
        counters.dead_letters += 1

    def make_agent(name: str) -> None:
        prefix, table_name, kind, judge = families[name]
        table = tables[table_name]
        owns_strays = name == "latency"  # keys of no family are dead-lettered once, here

        async def agent(stream: Any) -> None:
            async for event in stream.events():
                key = event.key.decode("utf-8", "replace") if event.key else ""
                if not key.startswith(prefix):
                    if owns_strays and not key.startswith(prefixes):
                        await dead_letter(event, f"unknown observation key {key[:80]!r}")
                    continue
                counters.records += 1
                try:
                    batch: list[Observation] = decode_batch(event.value or b"")
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    await dead_letter(event, f"bad observations: {exc}")
                    continue
                subject = key[len(prefix) :]
                state = _state(table.get(subject), kind)
                findings: list[Finding] = []
                now = time.time()
                for o in batch:
                    findings += judge(state, o, config)
                    counters.lags.append((now, max(0.0, now - o.at.timestamp())))
                counters.observations += len(batch)
                table[subject] = msgspec.to_builtins(state)
                await report(findings)

        agent.__name__ = f"{name}_detector"
        app.agent(topic, name=f"{name}-detector")(agent)

    for name in families:
        make_agent(name)

    directory = status_dir(settings)

    @app.timer(interval=STATUS_EVERY_S)
    async def write_status() -> None:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{os.getpid()}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(_status(app, counters, settings.topics.observations)))
        tmp.replace(path)

    async def on_stop() -> None:
        await appender.stop()
        await dead_letters.stop()
        (directory / f"{os.getpid()}.json").unlink(missing_ok=True)

    return app, on_stop


def _status(app: Any, counters: Counters, topic_name: str) -> dict[str, Any]:
    monitor = app.monitor
    lag = {}
    for tp, end in monitor.tp_end_offsets.items():
        read = monitor.tp_read_offsets.get(tp)
        lag[f"{tp.topic}/{tp.partition}"] = max(0, end - (read + 1 if read is not None else 0))
    recovery = app.tables.recovery
    now = time.time()
    recent = sorted(seconds for at, seconds in list(counters.lags) if at >= now - 60)
    last10 = sorted(seconds for at, seconds in list(counters.lags) if at >= now - 10)
    return {
        "pid": os.getpid(),
        "at": time.time(),
        "assigned": sorted(
            f"{tp.topic}/{tp.partition}"
            for tp in app.consumer.assignment()
            if tp.topic == topic_name
        ),
        "lag_records": lag,
        "recovering": bool(recovery.in_recovery),
        "recovery_remaining": int(recovery.active_remaining_total()),
        "records": counters.records,
        "observations": counters.observations,
        "findings": counters.findings,
        "dead_letters": counters.dead_letters,
        "lag_s": {
            "p50": recent[len(recent) // 2] if recent else None,
            "p99": recent[min(len(recent) - 1, int(len(recent) * 0.99))] if recent else None,
            "samples": len(recent),
            "p99_10s": last10[min(len(last10) - 1, int(len(last10) * 0.99))] if last10 else None,
        },
    }


def read_status(settings: Settings) -> list[dict[str, Any]]:
    """The status of every processors' worker that wrote one recently (stale ones are
    reported as stopped)."""
    out: list[dict[str, Any]] = []
    directory = status_dir(settings)
    if not directory.is_dir():
        return out
    now = time.time()
    for path in sorted(directory.glob("*.json")):
        try:
            status = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        status["stale"] = now - float(status.get("at", 0)) > STATUS_STALE_S
        out.append(status)
    return out


def run_worker(settings: Settings, bootstrap_servers: str, loglevel: str = "warn") -> None:
    """Run one processors' worker until SIGINT/SIGTERM (blocks; exits the process)."""
    import faust

    app, stopped = build_app(settings, bootstrap_servers)

    class Worker(faust.Worker):
        async def on_stop(self) -> None:
            await stopped()
            await super().on_stop()

    Worker(app, loglevel=loglevel, quiet=True).execute_from_commandline()
