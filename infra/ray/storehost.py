"""The store's own process: a Ray actor that owns the embedded ClickHouse and everything that
writes it, so the API process holds nothing but HTTP and the hop to the shard.

chDB serves one process per data path, and its inserts cost ~14 ms each whatever their size:
in the API process they took over half of its CPU (py-spy, issue 14). Here they share a
process with the projection worker (archive, facts, ingest, detectors, pruning) and the
read side's queries, which the API reaches through RemoteStore: the same calls as
AsyncStore (`call`, `call_with`, `search`, ...), each one actor call.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

from infra import gcpolicy
from infra.adapters.clickhouse.store import AsyncStore, ClickHouseStore
from infra.adapters.metrics import Metrics
from infra.config import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

STORE_HOST = "chatllm-store"
"""The actor's name (with the events topic): one per stack."""


class StoreHost:
    """Made remote with ray.remote in the composition root; plain and testable without Ray."""

    def __init__(
        self,
        settings: Settings,
        bootstrap_servers: str,
        pids: dict[str, int] | None = None,
        shards: list[Any] | None = None,
    ) -> None:
        """`pids`: processes the memory detector samples besides this one and the shards."""
        import os

        from infra.wiring import build_worker, open_store, rss_probe

        # Below the request path: on a small machine the API, the shards and the broker
        # come first; projections only lag a little more while they are busy. Linux keeps
        # a niceness per thread, and new threads take their creator's: every thread now.
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, int(tid), settings.streams.store_niceness)
        self.settings = settings
        self.bootstrap_servers = bootstrap_servers
        self.store: ClickHouseStore = open_store(settings)
        self.astore = AsyncStore(self.store)
        self.metrics = Metrics(turns=False)
        self._shards: list[Any] = list(shards or [])
        probe = rss_probe({**(pids or {}), "store": _pid()}, self._shards)
        self.metrics.processes(probe)
        self.worker, self.appender = build_worker(
            settings, bootstrap_servers, self.astore, metrics=self.metrics, probe=probe
        )
        self.metrics.gauge(
            "chatllm_archived_events",
            "Events the archive worker wrote.",
            lambda: self.worker.written,
        )
        self.metrics.gauge(
            "chatllm_dead_lettered_events",
            "Records the archive worker sent to the dead-letter topic.",
            lambda: self.worker.dead_lettered,
        )
        self._running: contextlib.AsyncExitStack | None = None
        self._rebuilds: dict[str, Any] = {}

    # -- lifecycle

    async def restore(self, embedded: bool) -> int:
        """Bring an empty embedded log back from the archive (before any shard reads it)."""
        from infra.wiring import recover_log

        return await recover_log(
            self.settings, self.store, self.bootstrap_servers, embedded=embedded
        )

    def watch(self, shards: list[Any]) -> None:
        """The shard actors, for the memory detector's samples."""
        self._shards[:] = shards

    async def start(self) -> None:
        """Run the projection worker (archive, facts, ingest, detectors, pruning)."""
        if self._running is None:
            running = contextlib.AsyncExitStack()
            await running.enter_async_context(self.worker.running())
            self._running = running
            gcpolicy.settle()

    async def stop(self, drain_s: float = 0.0) -> bool:
        """Stop the worker, first waiting up to `drain_s` for it to catch up with the log;
        True if it did. Then the store is closed."""
        drained = True
        if self._running is not None:
            if drain_s:
                drained = await self.worker.settled(time.time(), drain_s)
            running, self._running = self._running, None
            await running.aclose()
        with contextlib.suppress(Exception):
            await self.appender.stop()
        self.astore.close()
        self.store.close()
        return drained

    # -- the read side (what RemoteStore forwards)

    async def call_with(self, fn: Callable[[ClickHouseStore], T]) -> T:
        return await self.astore.call_with(fn)

    # -- the processors

    def counts(self) -> dict[str, int]:
        w = self.worker
        return {
            "archived": w.written,
            "dead_lettered": w.dead_lettered,
            "observed": w.observed,
            "observations_lost": w.observations_lost,
            "ingested": w.ingested,
        }

    def health(self) -> dict[str, Any]:
        return {name: h.report() for name, h in self.worker.health().items()}

    async def settled(self, since: float, timeout_s: float) -> bool:
        return await self.worker.settled(since, timeout_s)

    async def prune(self, tenant: str, max_age_days: float | None, requested_by: str) -> Any:
        return await self.worker.prune(
            max_age_days=max_age_days, requested_by=requested_by, tenant=tenant
        )

    def metrics_text(self) -> bytes:
        return self.metrics.exposition()

    def lag_summary(self, window_s: float = 60.0) -> dict[str, dict[str, float]]:
        return self.metrics.lag_summary(window_s)

    def pid(self) -> int:
        return _pid()

    # -- rebuilds (they read and write this process's chDB)

    def rebuild_start(
        self,
        projections: list[str],
        since: datetime | None,
        until: datetime | None,
        source: str,
    ) -> dict[str, Any]:
        from infra.services.rebuild import BrokerSource, RebuildJob

        if any(job.state == "running" for job in self._rebuilds.values()):
            raise RuntimeError("a rebuild is already running")
        job = RebuildJob(
            lambda: ClickHouseStore(self.settings.clickhouse).open(),
            projections,
            since,
            until,
            source=source,  # type: ignore[arg-type]
            broker=BrokerSource(self.bootstrap_servers, self.settings.topics.events),
        ).start()
        self._rebuilds[job.job_id] = job
        status: dict[str, Any] = job.status()
        return status

    def rebuild_status(self, job_id: str) -> dict[str, Any] | None:
        job = self._rebuilds.get(job_id)
        return None if job is None else job.status()


def _pid() -> int:
    import os

    return os.getpid()


class RemoteStore(AsyncStore):
    """AsyncStore's calls, answered by the StoreHost actor (its store, its thread)."""

    def __init__(self, host: Any) -> None:  # no local store, no thread
        self.host = host

    async def _remote(self, ref: Any) -> Any:
        try:
            return await ref
        except Exception as exc:
            # The store's own error (a bad query, an unknown context), not Ray's wrapper
            # with a traceback from another process.
            cause = getattr(exc, "cause", None)
            if isinstance(cause, Exception):
                raise cause from None
            raise

    async def call_with(self, fn: Callable[[ClickHouseStore], T]) -> T:
        result: T = await self._remote(self.host.call_with.remote(fn))
        return result

    def close(self) -> None:
        return None
