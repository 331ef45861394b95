"""Running chat-llm: `up` (the whole stack), `worker`, `demo`, and the hidden `api` (one more
API process of a running stack)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import typer
from rich.markup import escape

from infra.cli.common import (
    ConfigOpt,
    ProfileOpt,
    _load,
    _run,
    _setup_logging,
    err,
    out,
    print_audit,
)
from infra.config import LoadedConfig, Settings, load_config

commands = typer.Typer()
"""Top-level commands; main.py adds them to the `chatllm` app."""


def _listening_socket(host: str, port: int) -> Any:
    """The API's socket, bound with SO_REUSEPORT: every API process of the stack binds the
    same port, and the kernel spreads the connections over them."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        err.print(f"[red]cannot listen on {host}:{port}:[/red] {exc.strerror or exc}")
        raise typer.Exit(1) from None
    sock.set_inheritable(True)
    return sock


async def _serve(
    stack: Any,
    stop: asyncio.Event | None = None,
    ready: asyncio.Event | None = None,
    api_process: int = 0,
) -> None:
    """Serve the HTTP API until Ctrl-C or `stop`."""
    import uvicorn

    from infra.adapters.tracing import setup_tracing
    from infra.http.app import build_api

    settings: Settings = stack.settings
    setup_tracing(settings.tracing.otlp_endpoint, "chatllm-api", settings.tracing.export_delay_ms)
    if api_processes(settings) > 1:
        stack.metrics.shared(api_metrics_dir(settings), api_process)
    api = build_api(
        gateway=stack.gateway,
        store=stack.astore,
        settings=settings,
        archive_stats=lambda: (0, 0),  # health_report answers with the store host's counts
        metrics=stack.metrics,
        lifespan=stack.processors,
        live_counts=stack.counts,
        lag_summary=stack.lag_summary,
        more_metrics=stack.host_metrics,
        rebuilds=stack.host,
        prune=stack.prune,
        ingest=stack.ingest,
        admin_log=stack.appender,
        bootstrap_servers=stack.bootstrap_servers,
        plugins=stack.plugins,
        workflows=stack.workflows,
        use_profile=stack.use_profile,
        knowledge=stack.knowledge,
        health_report=stack.health,
        settled=stack.settled,
        api_process=api_process,
        keys=stack.keys,
    )
    server = uvicorn.Server(
        uvicorn.Config(
            api,
            host=settings.http.host,
            port=settings.http.port,
            log_level="warning",
            lifespan="on",
        )
    )
    sock = _listening_socket(settings.http.host, settings.http.port)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not serving.done():  # noqa: ASYNC110 (uvicorn has no event)
        await asyncio.sleep(0.05)
    if server.started:
        from infra import gcpolicy

        gcpolicy.settle()
    if server.started and stack.primary:
        out.print(
            f"chat-llm is up: http://{settings.http.host}:{settings.http.port}"
            f"  (broker {stack.bootstrap_servers}, "
            f"ClickHouse {settings.clickhouse.url or settings.clickhouse.path}) - Ctrl-C stops it",
            highlight=False,
        )
        if ready is not None:
            ready.set()
    publishing = asyncio.create_task(_publish_turn_counters(stack.metrics))
    try:
        if stop is not None:
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
            server.should_exit = True  # graceful: lifespan shutdown stops the projection worker
            stopping.cancel()
        await serving
    finally:
        publishing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await publishing
        with contextlib.suppress(OSError):
            stack.metrics.publish()  # the last counts, for the processes still serving


PUBLISH_INTERVAL_S = 1.0
"""How often an API process writes its turn counters for the others' /metrics."""


async def _publish_turn_counters(metrics: Any) -> None:
    if metrics.peers is None:
        return
    while True:
        try:
            metrics.publish()
        except OSError as exc:
            logging.getLogger("chatllm").warning("turn counters not shared: %s", exc)
        await asyncio.sleep(PUBLISH_INTERVAL_S)


def api_processes(settings: Settings) -> int:
    """How many API processes `chatllm up` runs: http.workers, 0 meaning one per two cores."""
    import os

    return settings.http.workers or max(1, (os.cpu_count() or 1) // 2)


def api_metrics_dir(settings: Settings) -> Path:
    """Where the API processes of one `chatllm up` share their turn counters."""
    return Path(settings.streams.datadir) / "api"


def _start_stack(settings: Settings, loaded: LoadedConfig | None = None) -> Any:
    from infra.runtime import Stack

    with out.status("starting broker, ClickHouse, Ray and the processors ..."):
        return Stack.start(settings, loaded)


@commands.command()
def up(config: Path | None = ConfigOpt, profile: str | None = ProfileOpt) -> None:
    """Start the whole stack (broker, ClickHouse, Ray, processors, HTTP) until Ctrl-C."""
    loaded = _load(config, profile)
    settings = loaded.settings
    _setup_logging(settings)
    if not settings.auth.required and settings.http.host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger("chatllm").warning(
            "auth.required is off and http.host is %s: anyone who reaches this address acts"
            " for any tenant, admin routes included; set auth.required = true",
            settings.http.host,
        )
    stack = _start_stack(settings, loaded)
    _stop_on_sigterm()
    others: list[Any] = []
    try:
        others = _more_api_processes(stack, config, profile)
        _run(_serve(stack))
    except KeyboardInterrupt:
        pass
    finally:
        from infra.adapters.tracing import shutdown_tracing

        _stop_processes(others)
        stack.stop()
        shutdown_tracing()
    out.print("chat-llm stopped")


def _stop_on_sigterm() -> None:
    """SIGTERM (systemd, Kubernetes, `kill`) stops the stack as Ctrl-C does. Without this,
    Ray's driver handler (installed by ray.init) turns it into SystemExit in the middle of
    uvicorn's shutdown: a traceback, exit status 15 and no "chat-llm stopped"."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def _more_api_processes(stack: Any, config: Path | None, profile: str | None) -> list[Any]:
    """http.workers - 1 more API processes on the same port (0: one per two cores); each joins
    this stack's Ray cluster and finds its store host and shards by name."""
    import os
    import subprocess

    import ray

    settings: Settings = stack.settings
    count = api_processes(settings)
    for stale in api_metrics_dir(settings).glob("api-*.json"):  # a previous run's counts
        stale.unlink(missing_ok=True)
    env = {**os.environ, "CHATLLM_BROKER__BOOTSTRAP_SERVERS": stack.bootstrap_servers}
    gcs = ray.get_runtime_context().gcs_address
    where = [
        *(["--config", str(config)] if config else []),
        *(["--profile", profile] if profile else []),
    ]
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "infra.cli",
                "api",
                "--ray-address",
                gcs,
                "--index",
                str(index),
                *where,
            ],
            env=env,
            stdin=subprocess.DEVNULL,
        )
        for index in range(1, count)
    ]


def _stop_processes(processes: list[Any], timeout_s: float = 10.0) -> None:
    import signal as signals
    import subprocess

    for process in processes:
        if process.poll() is None:
            process.send_signal(signals.SIGINT)
    for process in processes:
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@commands.command("api", hidden=True)
def api_process(
    ray_address: str = typer.Option(..., "--ray-address", help="the stack's Ray (GCS) address"),
    index: int = typer.Option(1, "--index", help="this API process's number"),
    config: Path | None = ConfigOpt,
    profile: str | None = ProfileOpt,
) -> None:
    """One more API process of a running `chatllm up` (it starts them itself)."""
    from infra.runtime import Stack

    loaded = _load(config, profile)
    settings = loaded.settings
    _setup_logging(settings)
    stack = Stack.attach(settings, ray_address, loaded)
    _stop_on_sigterm()
    try:
        _run(_serve(stack, api_process=index))
    except KeyboardInterrupt:
        pass
    finally:
        stack.stop()


@commands.command()
def worker(
    config: Path | None = ConfigOpt,
    profile: str | None = ProfileOpt,
    processors: bool = typer.Option(
        False,
        "--processors",
        help="Run the stateful anomaly detectors (Faust; no ClickHouse) instead of the"
        " projection worker. Several may run: they share the partitions as one group.",
    ),
) -> None:
    """Run one projection worker (and workflow runner) against the configured broker and
    ClickHouse, or with --processors one worker of the stateful detectors."""
    settings = _load(config, profile).settings
    _setup_logging(settings)
    if not settings.broker.bootstrap_servers:
        err.print(
            "[red]worker needs broker.bootstrap_servers (the embedded broker lives in `up`)[/red]"
        )
        raise typer.Exit(2)
    if processors:
        from infra.services.processors import run_worker

        if not settings.anomalies.enabled:
            err.print("[red]anomalies.enabled is false: there is nothing to detect[/red]")
            raise typer.Exit(2)
        level = {"DEBUG": "debug", "INFO": "info", "WARNING": "warn", "ERROR": "error"}
        run_worker(settings, settings.broker.bootstrap_servers, level[settings.log.level])
        return
    from infra.adapters.clickhouse.store import AsyncStore
    from infra.wiring import build_worker, open_store, workflow_catalog, workflow_runner

    store = open_store(settings)
    astore = AsyncStore(store)
    bootstrap = settings.broker.bootstrap_servers
    archive, appender = build_worker(settings, bootstrap, astore)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        runs = contextlib.AsyncExitStack()
        runner = None
        if settings.workflows.run:
            workflow_catalog(settings).definitions()  # imports the folder's Python steps
            runner = workflow_runner(settings, bootstrap, appender, astore)
            await runs.enter_async_context(runner.running())
        async with runs, archive.running():
            out.print("projection worker running", highlight=False)
            last, finished = -1, 0
            while not stop.is_set() and archive.failed is None:
                if archive.written != last:
                    last = archive.written
                    out.print(
                        f"archived {last} dead-lettered {archive.dead_lettered}", highlight=False
                    )
                if runner is not None and runner.finished != finished:
                    finished = runner.finished
                    out.print(f"workflow runs finished {finished}", highlight=False)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)

    async def main() -> None:
        try:
            await run()
        finally:
            await appender.stop()

    try:
        _run(main())
    finally:
        astore.close()
        store.close()


DEMO_SCRIPT = [
    ("alice", "Hello! Can you help me plan a trip to Lisbon?"),
    ("alice", "What should I see on the first day?"),
    ("bob", "Explain event sourcing in one sentence."),
    ("alice", "And where should I eat in the evening?"),
    ("bob", "Why is the log the source of truth?"),
]


async def _demo(stack: Any) -> None:
    stop, ready = asyncio.Event(), asyncio.Event()
    serving = asyncio.create_task(_serve(stack, stop, ready))
    waiting = asyncio.create_task(ready.wait())
    await asyncio.wait({serving, waiting}, return_when=asyncio.FIRST_COMPLETED)
    if serving.done():
        serving.result()  # raises the start-up error
    settings: Settings = stack.settings
    base = f"http://{settings.http.host}:{settings.http.port}"
    contexts = {"alice": "demo-trip-lisbon", "bob": "demo-event-sourcing"}
    expected: dict[str, int] = {}
    try:
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            for user, text in DEMO_SCRIPT:
                context = contexts[user]
                response = await client.post(
                    f"/v1/contexts/{context}/messages", json={"content": text, "user_id": user}
                )
                response.raise_for_status()
                turn = response.json()
                expected[context] = turn["events"][-1]["stream_version"]
                out.print(f"[bold]{user}[/bold] → {escape(text)}", highlight=False)
                out.print(
                    f"  [green]{turn['model']}[/green] ← {escape(turn['reply'])}", highlight=False
                )
            with out.status("waiting for the archive to catch up ..."):
                deadline = time.monotonic() + 60
                rows: list[dict[str, Any]] = []
                while time.monotonic() < deadline:
                    rows = (await client.get(f"/v1/contexts/{contexts['alice']}/events")).json()
                    if len(rows) >= expected[contexts["alice"]]:
                        break
                    await asyncio.sleep(0.1)
        print_audit(rows, contexts["alice"], "table")
        out.print(
            f"{sum(expected.values())} events over {len(contexts)} contexts went Ray actor → Kafka"
            " → projection worker → ClickHouse; above is the audit trail of one of them."
        )
    finally:
        stop.set()
        await serving


@commands.command()
def demo(config: Path | None = ConfigOpt, profile: str | None = ProfileOpt) -> None:
    """Start a throw-away embedded stack, drive a scripted workload, print the audit trail."""
    from infra.adapters.kafka.broker import free_port

    _load(config, profile)  # reports a bad config before anything starts
    workdir = Path(tempfile.mkdtemp(prefix="chatllm-demo-"))
    overrides = {
        "clickhouse.path": str(workdir / "chdb"),
        "streams.datadir": str(workdir),
        "http.port": free_port(),
    }
    settings = load_config(config, profile, overrides=overrides).settings
    _setup_logging(settings)
    stack = _start_stack(settings)
    try:
        _run(_demo(stack))
    finally:
        stack.stop()
