"""The composition root: starts and wires the broker, ClickHouse, Ray and the projection worker.

This is the only place where plain classes become Ray actors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from events import ConfigChange, ConfigChanged
from events.standalone import standalone
from infra.adapters.clickhouse.store import AsyncStore
from infra.adapters.clock import SystemClock
from infra.adapters.kafka.broker import EmbeddedBroker
from infra.adapters.kafka.clients import KafkaEventSink
from infra.adapters.metrics import Metrics
from infra.config import (
    LoadedConfig,
    RayConfig,
    Settings,
    changes,
    is_live,
    load_config,
)
from infra.ray.gateway import Gateway
from infra.ray.lease import LEASE_REGISTRY, LeaseRegistry
from infra.ray.shard import ChatShard
from infra.ray.storehost import RemoteStore
from infra.services.bus import EventBus
from infra.services.ingest import Ingest
from infra.services.keys import KeyService
from infra.services.knowledge import KnowledgeBase
from infra.services.plugins import PluginHost
from infra.services.processors import STATUS_STALE_S, read_status
from infra.services.workflows import (
    Catalog,
    GatewayChat,
)
from infra.wiring import (
    WORKFLOW_SCAN_S,
    Idle,
    knowledge_base,
    plugin_host,
    prepare_topics,
    workflow_catalog,
    workflow_runner,
)
from streams.loop import LoopHealth

log = logging.getLogger(__name__)


def start_ray(config: RayConfig) -> None:
    """Connect to the configured Ray cluster, or start Ray on this machine."""
    import ray

    if ray.is_initialized():
        return
    if config.address:
        ray.init(address=config.address, namespace=config.namespace, log_to_driver=False)
    else:
        ray.init(
            num_cpus=config.num_cpus or None,
            namespace=config.namespace,
            include_dashboard=False,
            log_to_driver=False,
            # Ray nices its workers (15) by default; ours are on the request path, and a
            # niced shard waits behind everything else on a busy machine.
            _system_config={"worker_niceness": 0},
        )


def start_shards(settings: Settings, bootstrap_servers: str) -> list[Any]:
    """The Ray actors that own the tenants; restarted by Ray if their process dies."""
    import ray

    # One registry of write leases: a shard Ray replaced while its old process still ran
    # can no longer write (infra/ray/lease.py).
    leases = (
        ray.remote(LeaseRegistry)
        .options(
            name=f"{LEASE_REGISTRY}:{settings.topics.events}",
            get_if_exists=True,
            num_cpus=0,
            max_restarts=-1,
        )
        .remote(settings.ray.lease_ttl_s)
    )
    remote_shard: Any = ray.remote(ChatShard)
    hosts = [
        remote_shard.options(
            # A name, so that every API process finds the same shards.
            name=shard_name(settings, index),
            # Actors reserve a CPU each by default: on 2 cores that would starve Ray.
            num_cpus=0,
            max_restarts=-1,
            max_concurrency=1000,
        ).remote(settings, bootstrap_servers, index, settings.ray.shards, leases)
        for index in range(settings.ray.shards)
    ]
    ray.get([h.ready.remote() for h in hosts])
    return hosts


def shard_name(settings: Settings, index: int) -> str:
    return f"chatllm-shard:{settings.topics.events}:{index}"


SETTLE_WAIT_S = 10.0
"""How long an archive read waits for the archive to catch up to the moment it was asked."""


def start_processors(settings: Settings, bootstrap_servers: str) -> Any:
    """The processors' worker as a child process with exactly these settings; None when
    the detectors are off."""
    import subprocess
    import sys

    from infra.adapters.kafka.broker import die_with_parent
    from infra.config import ENV_PREFIX, settings_env

    if not settings.anomalies.enabled:
        return None
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env |= settings_env(settings)
    env |= {
        f"{ENV_PREFIX}CONFIG": os.devnull,
        f"{ENV_PREFIX}BROKER__BOOTSTRAP_SERVERS": bootstrap_servers,
    }
    log_dir = Path(settings.streams.datadir)
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "processors.log", "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "infra.cli", "worker", "--processors"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            # Its own process group (a terminal's Ctrl-C reaches the stack, which stops it
            # first, in order), and it goes when we go, even by SIGKILL.
            process_group=0,
            preexec_fn=die_with_parent,
        )


def stop_processors(process: Any, timeout_s: float = 20.0) -> None:
    import signal
    import subprocess

    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        log.warning("the processors' worker did not stop in %.0f s: killed", timeout_s)
        process.kill()
        process.wait()


def start_broker(
    settings: Settings, log_dir: Path | None = None
) -> tuple[EmbeddedBroker | None, str]:
    """The configured Kafka, or the embedded tansu broker when none is configured."""
    if settings.broker.bootstrap_servers:
        return None, settings.broker.bootstrap_servers
    log_path = None
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)  # a fresh clone has no .chatllm/ yet
        log_path = log_dir / "tansu.log"
    broker = EmbeddedBroker(port=settings.broker.embedded_port, log_path=log_path).start()
    return broker, broker.bootstrap_servers


def start_store_host(
    settings: Settings, bootstrap_servers: str, pids: dict[str, int], *, embedded: bool
) -> Any:
    """The actor that owns the embedded ClickHouse and the projection worker (the API process
    holds no store): opened, migrated, and the log restored from it before anything reads."""
    import ray

    from infra.ray.storehost import STORE_HOST, StoreHost

    remote: Any = ray.remote(StoreHost)
    host = remote.options(
        name=f"{STORE_HOST}:{settings.topics.events}",
        num_cpus=0,
        max_restarts=0,  # its worker and its store open once; a crash is a stop
        max_concurrency=1000,
    ).remote(absolute_paths(settings), bootstrap_servers, pids)
    ray.get(host.restore.remote(embedded))
    return host


def absolute_paths(settings: Settings) -> Settings:
    """The same settings with the data path made absolute (actors run elsewhere)."""
    clickhouse = msgspec.structs.replace(
        settings.clickhouse, path=str(Path(settings.clickhouse.path).resolve())
    )
    return msgspec.structs.replace(settings, clickhouse=clickhouse)


@contextlib.asynccontextmanager
async def _supervised(
    supervise: Callable[[], Coroutine[Any, Any, None]], feeding: contextlib.AsyncExitStack
) -> AsyncIterator[None]:
    """Run `supervise` beside the body; on the way out, cancel it and close what it entered
    into `feeding` (the loops it started)."""
    supervisor = asyncio.create_task(supervise())
    try:
        yield
    finally:
        supervisor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await supervisor
        await feeding.aclose()


@dataclass
class Stack:
    """Everything `chatllm up` runs, started in dependency order: the broker (a child), Ray,
    the store host (an actor: ClickHouse and the projection worker), the shards (actors);
    this process keeps HTTP and the hop to the shard. Long as a class: its methods are the
    start and stop steps, in order, each short; read start() top to bottom."""

    settings: Settings
    bootstrap_servers: str
    astore: AsyncStore
    host: Any
    """The StoreHost actor."""
    gateway: Gateway
    appender: KafkaEventSink
    ingest: Ingest
    plugins: PluginHost
    workflows: Catalog
    knowledge: KnowledgeBase
    hosts: list[Any]
    metrics: Metrics
    keys: KeyService
    """The API keys this process knows, kept current from the log."""
    broker: EmbeddedBroker | None = None
    detector_worker: Any = None
    """The processors' worker (a child process running infra/services/processors.py), if started."""
    owns_ray: bool = False
    loaded: LoadedConfig | None = None
    """The configuration in effect (its file and profile), for `chatllm config use`."""
    primary: bool = True
    """The process that started the stack (it runs the workflow runner, the plugins' bus
    and the knowledge refresh, and stops the rest); other API processes only serve."""
    _stopped: bool = field(default=False, repr=False)
    _loops: dict[str, LoopHealth | Idle] = field(default_factory=dict, repr=False)
    """The consume loops running in this process (workflows, the plugins' bus)."""

    async def health(self) -> dict[str, Any]:
        """Every consumer of the stack with its lag, and `stuck` with the reason when one
        is (a batch in hand too long, a loop that stopped): what /healthz shows."""
        consumers = {name: h.report() for name, h in self._loops.items()}
        try:
            consumers |= await self.host.health.remote()
            counts = await self.host.counts.remote()
        except Exception as exc:  # the store host is gone: say so, do not fail the probe
            why = f"the store host does not answer: {type(exc).__name__}"
            consumers["store"] = {
                "status": "stuck",
                "lag": None,
                "busy_s": 0.0,
                "last_error": type(exc).__name__,
                "reason": why,
            }
            counts = {"archived": 0, "dead_lettered": 0}
        consumers |= self.processors_health()
        stuck = sorted(n for n, c in consumers.items() if c["status"] == "stuck")
        return {
            "status": "degraded" if stuck else "ok",
            "stuck": stuck,
            "archived": counts["archived"],
            "dead_lettered": counts["dead_lettered"],
            "consumers": consumers,
        }

    async def counts(self) -> dict[str, Any]:
        counts: dict[str, Any] = await self.host.counts.remote()
        statuses = [s for s in read_status(self.settings) if not s["stale"]]
        counts["findings"] = sum(s["findings"] for s in statuses)
        counts["processors"] = [
            {
                "pid": s["pid"],
                "partitions": len(s["assigned"]),
                "lag_records": sum(s["lag_records"].values()),
                "lag_p99_s": s["lag_s"]["p99"],
                "lag_p99_10s": s["lag_s"].get("p99_10s"),
                "recovering": s["recovering"],
                "findings": s["findings"],
                "dead_letters": s["dead_letters"],
            }
            for s in statuses
        ]
        return counts

    def processors_health(self) -> dict[str, dict[str, Any]]:
        """The processors' workers as consumers for /healthz: each one's lag; stuck when
        its status went stale, or when the child `chatllm up` started has exited."""
        out: dict[str, dict[str, Any]] = {}
        for status in read_status(self.settings):
            out[f"processors-{status['pid']}"] = {
                "status": "stuck" if status["stale"] else "ok",
                "lag": sum(status["lag_records"].values()),
                "busy_s": 0.0,
                "last_error": "",
                "reason": (
                    f"no status for {STATUS_STALE_S:.0f} s" if status["stale"] else
                    "recovering its tables" if status["recovering"] else ""
                ),
            }  # fmt: skip
        child = self.detector_worker
        if child is not None and child.poll() is not None:
            out["processors"] = {
                "status": "stuck",
                "lag": None,
                "busy_s": 0.0,
                "last_error": f"exit code {child.returncode}",
                "reason": "the processors' worker exited (see .chatllm/processors.log)",
            }
        return out

    async def processors_metrics(self) -> bytes:
        """The processors' workers in Prometheus text: lag in records per partition, lag in
        seconds (event time to judgement, last minute), table recovery, counts."""
        lines = [
            "# HELP chatllm_processors_lag_records Observations not yet read, per partition.",
            "# TYPE chatllm_processors_lag_records gauge",
        ]
        statuses = [s for s in read_status(self.settings) if not s["stale"]]
        for s in statuses:
            for tp, lag in sorted(s["lag_records"].items()):
                lines.append(
                    f'chatllm_processors_lag_records{{worker="{s["pid"]}",partition="{tp}"}} {lag}'
                )
        lines += [
            "# HELP chatllm_processors_lag_seconds From an observation's event time to its"
            " judgement, over the last minute.",
            "# TYPE chatllm_processors_lag_seconds gauge",
        ]
        for s in statuses:
            for q in ("p50", "p99"):
                value = s["lag_s"][q]
                if value is not None:
                    lines.append(
                        f'chatllm_processors_lag_seconds{{worker="{s["pid"]}",quantile="{q}"}}'
                        f" {value}"
                    )
        for name, key, help_ in (
            ("recovering", "recovering", "1 while the worker recovers its tables."),
            ("recovery_remaining", "recovery_remaining", "Changelog records left to recover."),
            ("findings", "findings", "AnomalyDetected events appended."),
            ("dead_letters", "dead_letters", "Observation records dead-lettered."),
        ):
            lines += [
                f"# HELP chatllm_processors_{name} {help_}",
                f"# TYPE chatllm_processors_{name} gauge",
            ]
            for s in statuses:
                lines.append(f'chatllm_processors_{name}{{worker="{s["pid"]}"}} {int(s[key])}')
        return ("\n".join(lines) + "\n").encode()

    async def settled(self, since: float) -> bool:
        """Read-your-writes for the archive's read routes: wait until everything acknowledged
        before `since` is archived. Normally a fetch or two (under a second); the bound is
        for an archive that is joining its group (right after a start) or behind."""
        done: bool = await self.host.settled.remote(since, SETTLE_WAIT_S)
        if not done:
            log.warning(
                "an archive read waited %.0f s and the archive is still behind", SETTLE_WAIT_S
            )
        return done

    async def lag_summary(self) -> dict[str, Any]:
        summary: dict[str, Any] = await self.host.lag_summary.remote()
        return summary

    async def host_metrics(self) -> bytes:
        text: bytes = await self.host.metrics_text.remote()
        return text + await self.processors_metrics()

    @classmethod
    def attach(
        cls, settings: Settings, ray_address: str, loaded: LoadedConfig | None = None
    ) -> Stack:
        """One more API process for a running stack: it joins its Ray cluster and finds the
        store host and the shards by name (their broker is settings.broker)."""
        import ray

        from infra.ray.storehost import STORE_HOST

        bootstrap = settings.broker.bootstrap_servers
        ray.init(address=ray_address, namespace=settings.ray.namespace, log_to_driver=False)
        topic = settings.topics.events
        host = ray.get_actor(f"{STORE_HOST}:{topic}")
        hosts = [ray.get_actor(shard_name(settings, i)) for i in range(settings.ray.shards)]
        return cls._around(settings, bootstrap, host, hosts, owns_ray=True, loaded=loaded,
                           primary=False)  # fmt: skip

    @classmethod
    def _around(
        cls, settings: Settings, bootstrap: str, host: Any, hosts: list[Any], **extra: Any
    ) -> Stack:
        """This process's part around the running actors: the gateway, the store's remote,
        its own producer, ingest, plugins, workflows and knowledge base, its metrics."""
        astore = RemoteStore(host)
        appender = KafkaEventSink(bootstrap, settings.topics.events, settings.broker)
        return cls(
            settings=settings,
            bootstrap_servers=bootstrap,
            astore=astore,
            host=host,
            gateway=Gateway(
                hosts,
                sorted({d.model for d in settings.deployments}),
                settings.ray.shard_transport,
            ),
            appender=appender,
            ingest=Ingest(settings, bootstrap),
            plugins=plugin_host(settings, appender, astore),
            workflows=workflow_catalog(settings),
            knowledge=knowledge_base(settings, appender, astore),
            hosts=hosts,
            metrics=Metrics(projections=False),
            keys=KeyService(settings, appender, astore, bootstrap),
            **extra,
        )

    @classmethod
    def start(cls, settings: Settings, loaded: LoadedConfig | None = None) -> Stack:
        """Start the stack (blocking); call stop() to take it down in reverse order."""
        import os

        import ray

        broker, bootstrap = start_broker(settings, Path(settings.streams.datadir))
        owns_ray = False
        try:
            prepare_topics(settings, bootstrap)
            owns_ray = not ray.is_initialized()
            start_ray(settings.ray)
            pids = {"api": os.getpid()}
            if broker is not None and broker.pid is not None:
                pids["broker"] = broker.pid
            host = start_store_host(settings, bootstrap, pids, embedded=broker is not None)
            hosts = start_shards(settings, bootstrap)
            ray.get(host.watch.remote(hosts))
            ray.get(host.start.remote())
        except BaseException:
            if owns_ray and ray.is_initialized():
                ray.shutdown()
            if broker is not None:
                broker.stop()
            raise
        processors = start_processors(settings, bootstrap)
        return cls._around(
            settings,
            bootstrap,
            host,
            hosts,
            broker=broker,
            owns_ray=owns_ray,
            loaded=loaded,
            detector_worker=processors,
        )

    @contextlib.asynccontextmanager
    async def processors(self) -> AsyncIterator[None]:
        """Run the plugins (their folder watched, their on_event fed by a bus subscriber),
        the workflow runner and the knowledge refresh on the running loop for the duration
        of the block (the projection worker runs in the store host)."""
        self._loops["keys"] = self.keys.health
        try:
            if not self.primary:  # the hooks of its own requests; the rest runs once
                async with self.keys.following(), self._plugins_running(listen=False):
                    yield
                return
            async with (
                self.keys.following(),
                self._plugins_running(),
                self._workflows_running(),
                self._knowledge_refreshed(),
            ):
                yield
        finally:
            with contextlib.suppress(Exception):
                await self.appender.stop()
            await self.ingest.stop()

    @contextlib.asynccontextmanager
    async def _knowledge_refreshed(self) -> AsyncIterator[None]:
        """Re-ingest the knowledge sources on the configured schedule (first at start)."""
        interval = self.settings.kb.reingest_interval_s
        if not interval or not self.settings.kb.sources:
            yield
            return

        async def refresh() -> None:
            while True:
                try:
                    for report in await self.knowledge.ingest():
                        log.info("knowledge source %s: %s", report.source, report)
                except Exception:
                    log.exception("knowledge re-ingestion failed; retrying next round")
                await asyncio.sleep(interval)

        task = asyncio.create_task(refresh(), name="knowledge-refresh")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @contextlib.asynccontextmanager
    async def _workflows_running(self) -> AsyncIterator[None]:
        """The workflow runner, from the moment a workflow is defined. It reads every event of
        the log; with no workflow there is nothing for it to drive, and the embedded broker
        pays for each consumer that fetches from a long log (measured: its CPU per turn
        after 100,000 turns went from 0.35 to 1.75 ms with two such consumers)."""
        if not self.settings.workflows.run:
            yield
            return
        feeding = contextlib.AsyncExitStack()

        async def start_runner() -> None:
            runner = workflow_runner(
                self.settings,
                self.bootstrap_servers,
                self.appender,
                self.astore,
                chat=GatewayChat(self.gateway),
                plugins=self.plugins,
                knowledge=self.knowledge,
            )
            self._loops["workflows"] = runner.health
            await feeding.enter_async_context(runner.running())

        async def supervise() -> None:
            while True:
                try:
                    # Imports the folder's Python steps before runs resume.
                    defined = bool(self.workflows.definitions())
                except Exception:
                    log.exception("reading the workflow definitions failed")
                    defined = False
                if defined:
                    await start_runner()
                    return
                await asyncio.sleep(WORKFLOW_SCAN_S)

        self._loops["workflows"] = Idle(
            "no workflow is defined (workflows.folder): the runner starts with the first"
        )
        async with _supervised(supervise, feeding):
            yield

    @contextlib.asynccontextmanager
    async def _plugins_running(self, listen: bool = True) -> AsyncIterator[None]:
        p = self.settings.plugins
        if not p.folder and not p.entry_points:
            yield
            return
        await self.plugins.load_all()
        bus = EventBus(
            self.bootstrap_servers,
            name="plugins",
            topic=self.settings.topics.events,
            broker=self.settings.broker,
            start_at_end=True,  # plugins hear what happens from now on
        )
        bus.on("*", self.plugins.on_event)
        self._loops["plugins"] = bus.health
        feeding = contextlib.AsyncExitStack()

        async def supervise() -> None:
            # Hot reload, and the bus only once a plugin listens (consuming every event in
            # this process costs CPU that no one would use otherwise).
            while True:
                if (
                    listen
                    and not bus.is_running
                    and any("on_event" in plugin.hooks for plugin in self.plugins.plugins.values())
                ):
                    await feeding.enter_async_context(bus.running())
                await asyncio.sleep(p.reload_interval_s)
                try:
                    await self.plugins.scan()
                except Exception:
                    log.exception("plugin scan failed")

        try:
            async with _supervised(supervise, feeding):
                yield
        finally:
            await self.plugins.close()

    async def use_profile(self, profile: str, tenant_id: str, requested_by: str) -> dict[str, Any]:
        """Switch the running service to another profile of its config file: the live keys
        (limits, routing, deployments, sanitizer, log level, plugin config) take effect now,
        the rest at the next start; the change is a ConfigChanged event (who, before, after).
        ConfigError if the profile does not exist or does not validate."""
        before = self.loaded or load_config(env={})
        after = load_config(before.path, profile or None)
        changed = changes(before, after)
        live = [key for key, _, _ in changed if is_live(key)]
        if any(not k.startswith(("log.", "plugins.")) for k in live):
            await asyncio.gather(*(h.reconfigure.remote(after.settings) for h in self.hosts))
        if "log.level" in live:
            logging.getLogger().setLevel(after.settings.log.level)
        refused: dict[str, str] = {}
        if any(k.startswith("plugins.") for k in live):
            p = after.settings.plugins
            refused = await self.plugins.reconfigure(dict(p.config), p.failure_limit)
            if refused:  # the plugin kept its old config: this change did not take effect
                live = [k for k in live if not k.startswith("plugins.config")]
        event = standalone(
            ConfigChanged(
                profile_before=before.profile,
                profile_after=after.profile,
                changes=tuple(ConfigChange(key=k, before=b, after=a) for k, b, a in changed),
                applied=tuple(live),
                requested_by=requested_by,
            ),
            event_id=SystemClock().new_event_id(),
            tenant_id=tenant_id,
            user_id=requested_by,
            occurred_at=datetime.now(UTC),
            stream="config",
        )
        await self.appender.append([event])
        self.loaded = after
        return {
            "profile_before": before.profile,
            "profile_after": after.profile,
            "changes": [{"key": k, "before": b, "after": a} for k, b, a in changed],
            "applied": live,
            "refused": [
                {"key": k, "plugins": refused}
                for k, _, _ in changed
                if k.startswith("plugins.config") and refused
            ],
            "restart_required": [k for k, _, _ in changed if not is_live(k)],
            "event_id": event.event_id,
        }

    async def prune(
        self, tenant: str, max_age_days: float | None, requested_by: str
    ) -> dict[str, int]:
        """Prune one tenant's conversation memory now (recorded as a MemoryPruned event)."""
        pruned: dict[str, int] = await self.host.prune.remote(tenant, max_age_days, requested_by)
        return pruned

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        import ray

        self.gateway.close()
        if self.detector_worker is not None:
            stop_processors(self.detector_worker)
        if not self.primary:  # the stack is the primary's to stop
            ray.shutdown()
            return
        with contextlib.suppress(Exception):
            ray.get([h.shutdown.remote() for h in self.hosts], timeout=10)
        # The embedded broker's log goes with it: what it acknowledged is archived first
        # (the archive is the durable copy), then the store closes.
        drain_s = self.settings.streams.finish_timeout_s
        try:
            if not ray.get(self.host.stop.remote(drain_s), timeout=drain_s + 20):
                log.warning("stopped before the archive caught up with the log")
        except Exception as exc:
            log.warning("the store host did not stop cleanly: %r", exc)
        for actor in [*self.hosts, self.host]:
            with contextlib.suppress(Exception):
                ray.kill(actor)
        if self.owns_ray:
            ray.shutdown()
        if self.broker is not None:
            self.broker.stop()
