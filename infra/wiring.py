"""The builders that the composition root (runtime.py) and the Ray hosts (ray/) share: a
projection worker with its sinks, a store opened and migrated, the log recovered from the
archive, plugins, the knowledge base and the workflow runner of a process. Imports
services, adapters and config; never ray/, http or cli, so a Ray host may use it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from events.standalone import standalone
from infra.adapters.clickhouse.store import AsyncStore, ClickHouseStore
from infra.adapters.clock import SystemClock
from infra.adapters.embeddings import MiniLMEmbedder
from infra.adapters.kafka.clients import KafkaEventSink, KafkaObservationSink, ensure_topics
from infra.adapters.metrics import Metrics
from infra.config import Settings, StreamsConfig
from infra.services.knowledge import KnowledgeBase
from infra.services.plugins import PluginHost
from infra.services.restore import check_external_log, restore_embedded_log
from infra.services.workflows import (
    ArchivedDocuments,
    Catalog,
    ChatPort,
    HttpChat,
    RunnerSettings,
    WorkflowRunner,
    builtin_actions,
)
from streams.app import ARCHIVER_ID, ProjectionWorker, WorkerSettings


def worker_settings(settings: Settings, bootstrap_servers: str) -> WorkerSettings:
    s = settings.streams
    return WorkerSettings(
        bootstrap_servers=bootstrap_servers,
        events_topic=settings.topics.events,
        deadletter_topic=settings.topics.deadletter,
        batch_size=s.batch_size,
        batch_within_s=s.batch_within_s,
        session_timeout_s=s.session_timeout_s,
        heartbeat_interval_s=s.heartbeat_interval_s,
        rebalance_timeout_s=s.rebalance_timeout_s,
        commit_interval_s=s.commit_interval_s,
        fetch_wait_s=s.fetch_wait_s,
        fetch_min_bytes=s.fetch_min_bytes,
        finish_timeout_s=s.finish_timeout_s,
        stuck_after_s=s.stuck_after_s,
        ingest_topic=settings.topics.ingest,
        ingest_prefixes=tuple(settings.ingest.stream_prefixes),
        ingest_types=tuple(settings.ingest.allowed_types),
        max_record_bytes=settings.broker.max_record_bytes,
        max_append_attempts=settings.ingest.max_append_attempts,
        system_tenant=settings.tenant,
        memory_sample_s=settings.anomalies.memory_sample_s if settings.anomalies.enabled else 0,
        memory_max_age_days=settings.memory.max_age_days,
        prune_interval_s=settings.memory.prune_interval_s,
    )


def plugin_host(settings: Settings, log_sink: KafkaEventSink, store: AsyncStore) -> PluginHost:
    """The plugins of this process, their lifecycle events appended to the log."""
    clock = SystemClock()

    async def record(event: Any) -> None:
        await log_sink.append([event])

    async def emit(payload: Any) -> Any:
        event = standalone(
            payload,
            event_id=clock.new_event_id(),
            tenant_id=settings.tenant,
            user_id="plugins",
            occurred_at=datetime.now(UTC),
            stream="plugin-emit",
        )
        await log_sink.append([event])
        return event

    p = settings.plugins
    return PluginHost(
        folder=Path(p.folder) if p.folder else None,
        configs=dict(p.config),
        record=record,
        tenant_id=settings.tenant,
        store=store,
        emit=emit,
        failure_limit=p.failure_limit,
        entry_points=p.entry_points,
    )


def knowledge_base(
    settings: Settings, log_sink: KafkaEventSink, astore: AsyncStore
) -> KnowledgeBase:
    """The knowledge base of this process (the model loads on first use)."""

    async def record(event: Any) -> None:
        await log_sink.append([event])

    return KnowledgeBase(
        astore, MiniLMEmbedder(), settings.kb, default_tenant=settings.tenant, record=record
    )


def workflow_catalog(settings: Settings) -> Catalog:
    folder = settings.workflows.folder
    return Catalog(folder=Path(folder) if folder else None)


_RUNNER_STREAM_FIELDS = sorted(
    {f.name for f in dataclasses.fields(RunnerSettings)} & set(StreamsConfig.__struct_fields__)
)


def workflow_runner(
    settings: Settings,
    bootstrap_servers: str,
    log_sink: KafkaEventSink,
    astore: AsyncStore,
    *,
    chat: ChatPort | None = None,
    plugins: PluginHost | None = None,
    knowledge: KnowledgeBase | None = None,
) -> WorkflowRunner:
    """The runner of this process: drives the runs of the partitions it gets. A worker
    without a gateway sends chat steps to workflows.api_url, when one is set."""
    w, s = settings.workflows, settings.streams
    if chat is None and w.api_url:
        chat = HttpChat(w.api_url, w.api_key)
    actions = builtin_actions(
        chat=chat,
        knowledge=ArchivedDocuments(
            astore, knowledge or knowledge_base(settings, log_sink, astore)
        ),
        plugins=plugins,
        http_timeout_s=w.http_timeout_s,
        egress=settings.egress,
    )
    return WorkflowRunner(
        RunnerSettings(
            bootstrap_servers=bootstrap_servers,
            topic=settings.topics.events,
            max_output_bytes=w.max_output_bytes,
            # Group timing as the projection worker has it: every field both have, by name.
            **{n: getattr(s, n) for n in _RUNNER_STREAM_FIELDS},
        ),
        log_sink,
        actions,
    )


class Idle:
    """A consumer that has nothing to read yet, as /healthz reports it."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def report(self) -> dict[str, Any]:
        return {"status": "ok", "lag": None, "busy_s": 0.0, "last_error": "", "reason": self.reason}


WORKFLOW_SCAN_S = 2.0
"""How often an API process looks for its first workflow definition (then runs the runner)."""


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process in MiB (Linux /proc), None if it is gone."""

    try:
        with open(f"/proc/{pid}/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def rss_probe(pids_of: dict[str, int], hosts: list[Any]) -> Callable[[], dict[str, float]]:
    """{process: RSS MiB} of the named processes and the shard actors (`hosts` is read at
    each sample: it may be filled in later)."""

    def probe() -> dict[str, float]:
        pids = dict(pids_of)
        if hosts:
            import ray

            with contextlib.suppress(Exception):
                for i, pid in enumerate(ray.get([h.pid.remote() for h in hosts], timeout=5)):
                    pids[f"shard-{i}"] = pid
        found = {name: rss_mb(pid) for name, pid in pids.items()}
        return {name: mb for name, mb in found.items() if mb is not None}

    return probe


def build_worker(
    settings: Settings,
    bootstrap_servers: str,
    astore: AsyncStore,
    *,
    metrics: Metrics | None = None,
    probe: Callable[[], dict[str, float]] | None = None,
) -> tuple[ProjectionWorker, KafkaEventSink]:
    """The projection worker wired to its sink, the log (for its findings) and the clock;
    the returned sink must be stopped with the worker."""
    appender = KafkaEventSink(bootstrap_servers, settings.topics.events, settings.broker)
    observations = (
        KafkaObservationSink(bootstrap_servers, settings.topics.observations, settings.broker)
        if settings.anomalies.enabled
        else None
    )
    worker = ProjectionWorker(
        worker_settings(settings, bootstrap_servers),
        astore,
        observe_lag=metrics.observe_lags if metrics is not None else None,
        appender=appender,
        new_event_id=SystemClock().new_event_id,
        observations=observations,
        rss_probe=probe,
        pruner=astore.prune_counts,
    )
    return worker, appender


def prepare_topics(settings: Settings, bootstrap_servers: str) -> None:
    t = settings.topics
    asyncio.run(
        ensure_topics(
            bootstrap_servers, [t.events, t.ingest, t.deadletter, t.observations], t.partitions
        )
    )


async def recover_log(
    settings: Settings, store: ClickHouseStore, bootstrap_servers: str, *, embedded: bool
) -> int:
    """Before any shard reads the log: the embedded broker's log comes back from the archive
    (infra/services/restore.py); an external one that lost its log is reported. Returns how many
    events were restored."""
    topic = settings.topics.events
    if embedded:
        restored = await restore_embedded_log(
            store,
            bootstrap_servers,
            topic,
            ARCHIVER_ID,
            max_request_size=settings.broker.max_request_bytes,
        )
        return restored.events
    await check_external_log(store, bootstrap_servers, topic)
    return 0


def open_store(settings: Settings) -> ClickHouseStore:
    if not settings.clickhouse.url:
        Path(settings.clickhouse.path).parent.mkdir(parents=True, exist_ok=True)
    store = ClickHouseStore(settings.clickhouse).open()
    store.migrate()
    return store
