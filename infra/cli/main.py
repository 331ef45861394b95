"""The `chatllm` command line."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import itertools
import json
import logging
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from infra.config import ConfigError, LoadedConfig, Settings, load_config

app = typer.Typer(
    help="chat-llm: an event-sourced backbone for LLM chat services.", no_args_is_help=True
)
config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")
audit_app = typer.Typer(help="The audit trail: a context's events, and verify.")
app.add_typer(audit_app, name="audit")
replay_app = typer.Typer(help="Re-run the log: rebuild projections.", no_args_is_help=True)
app.add_typer(replay_app, name="replay")
dlq_app = typer.Typer(help="The dead-letter topic: list, show, retry.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")
kb_app = typer.Typer(help="The knowledge base: ingest, search, list.", no_args_is_help=True)
app.add_typer(kb_app, name="kb")
workflow_app = typer.Typer(
    help="Workflows: list them, run one, follow a run.", no_args_is_help=True
)
app.add_typer(workflow_app, name="workflow")
query_app = typer.Typer(help="Query the projections of the running service.", no_args_is_help=True)
app.add_typer(query_app, name="query")

out = Console()
err = Console(stderr=True, soft_wrap=True)  # a message is one line, whatever its length

ConfigOpt = typer.Option(
    None, "--config", "-c", help="TOML config file (default: ./chatllm.toml or $CHATLLM_CONFIG)"
)
ProfileOpt = typer.Option(
    None, "--profile", "-p", help="named profile in the config file ($CHATLLM_PROFILE)"
)
UrlOpt = typer.Option(None, "--url", help="API base URL (default: from http.host/http.port)")
TenantOpt = typer.Option(None, "--tenant", help="tenant (default: from config)")
FormatOpt = typer.Option("table", "--format", help="table, json or csv")
SinceOpt = typer.Option(None, "--since", help="from, ISO 8601 with zone")
UntilOpt = typer.Option(None, "--until", help="to (exclusive), ISO 8601 with zone")
KeyOpt = typer.Option(None, "--api-key", envvar="CHATLLM_API_KEY")


def _load(config: Path | None, profile: str | None) -> LoadedConfig:
    try:
        return load_config(config, profile)
    except ConfigError as exc:
        err.print(f"[red]config error:[/red] {exc}")
        raise typer.Exit(2) from None


def _setup_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log.level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # aiokafka narrates every rebalance at INFO; keep its warnings.
    for noisy in ("aiokafka", "kafka", "httpx"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def _base_url(settings: Settings, url: str | None) -> str:
    return url or f"http://{settings.http.host}:{settings.http.port}"


# ---- serving -------------------------------------------------------------------


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


def _run(coroutine: Any) -> Any:
    """Run on uvloop (uvicorn would pick it too, but we start the loop ourselves)."""
    import uvloop

    return uvloop.run(coroutine)


def _start_stack(settings: Settings, loaded: LoadedConfig | None = None) -> Any:
    from infra.runtime import Stack

    with out.status("starting broker, ClickHouse, Ray and the processors ..."):
        return Stack.start(settings, loaded)


@app.command()
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


@app.command("api", hidden=True)
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


@app.command()
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


# ---- client commands ------------------------------------------------------------


@app.command()
def chat(
    message: str = typer.Argument(..., help="what to say"),
    context: str | None = typer.Option(None, "--context", help="context id (new one if omitted)"),
    model: str = typer.Option("", "--model", help="ask for a model (default: the router decides)"),
    user: str = typer.Option("cli-user", "--user", help="user id (without an API key)"),
    api_key: str | None = typer.Option(None, "--api-key", envvar="CHATLLM_API_KEY", help="API key"),
    tenant: str | None = TenantOpt,
    url: str | None = UrlOpt,
    config: Path | None = ConfigOpt,
    profile: str | None = ProfileOpt,
) -> None:
    """Send one message through the running service (its OpenAI-compatible API); print the reply."""
    from infra.client import ChatClient, ChatError

    settings = _load(config, profile).settings
    base = _base_url(settings, url)
    client = ChatClient(base, api_key=api_key, tenant=tenant, user=user)
    try:
        reply = client.chat(message, context=context, model=model)
    except ChatError as exc:
        err.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(1) from None
    note = " · fallback" if reply.fallback else ""
    err.print(f"[dim]context {reply.context_id} · {reply.model}{note}[/dim]")
    sys.stdout.write(reply.content + "\n")  # unwrapped, so it pipes cleanly


@app.command("key")
def new_key(
    tenant: str = typer.Option(..., "--tenant", help="tenant the key belongs to"),
    user: str = typer.Option(..., "--user", help="user the key acts as"),
    scope: list[str] = typer.Option(
        ["chat", "query"], "--scope", help="chat, query, ingest, admin (repeatable)"
    ),
    limit: str = typer.Option("", "--limit", help='requests it may make, e.g. "600/minute"'),
) -> None:
    """Make a new API key: prints the key once, and the config entry that stores only its hash."""
    import secrets

    from infra.http.security import SCOPES

    unknown = sorted(set(scope) - set(SCOPES))
    if unknown:
        err.print(f"[red]unknown scope(s) {unknown}: {', '.join(SCOPES)}[/red]")
        raise typer.Exit(2)

    from infra.http.security import hash_key

    key = "sk-chatllm-" + secrets.token_urlsafe(24)
    err.print("[bold]API key (shown once, store it now):[/bold]")
    sys.stdout.write(key + "\n")
    err.print("\nadd to chatllm.toml:\n")
    entry = (
        f'[[auth.keys]]\nsha256 = "{hash_key(key)}"\ntenant = "{tenant}"\nuser = "{user}"\n'
        f"scopes = {json.dumps(sorted(set(scope)))}\n" + (f'limit = "{limit}"\n' if limit else "")
    )
    err.print(entry, highlight=False, markup=False)


def _fetch_audit(
    settings: Settings, context: str, tenant: str, url: str | None, api_key: str | None = None
) -> list[dict[str, Any]]:
    """From the running service if it answers, else straight from the store (embedded path)."""
    base = _base_url(settings, url)
    headers = {"X-Tenant-Id": tenant}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    try:
        response = httpx.get(f"{base}/v1/contexts/{context}/events", headers=headers, timeout=30)
    except httpx.TransportError:
        if url:
            err.print(f"[red]cannot reach chat-llm at {base}[/red]")
            raise typer.Exit(1) from None
    else:
        if response.status_code != 200:
            err.print(
                f"[red]{response.status_code}:[/red] {response.json().get('detail', response.text)}"
            )
            raise typer.Exit(1)
        result: list[dict[str, Any]] = response.json()
        return result

    with _local_store(settings) as store:
        return [
            {
                "stream_version": r.stream_version,
                "event_id": r.event_id,
                "type": r.type,
                "occurred_at": r.occurred_at.isoformat(),
                "user_id": r.user_id,
                "trace_id": r.trace_id,
                "causation_id": r.causation_id,
                "event": msgspec.json.decode(r.body),
            }
            for r in store.stream_events(tenant, context)
        ]


def _summary(event: dict[str, Any]) -> str:
    """One line on what an event says, for the audit table."""
    p = event.get("payload", {})
    match event.get("type"):
        case "ReplyCompleted":
            flag = ", fallback" if p.get("fallback") else ""
            text = (
                f"({p.get('model')}{flag}, {p.get('latency_ms', 0):.1f} ms) {p.get('content', '')}"
            )
        case "ReplyFailed":
            text = f"{p.get('error_class')}: {p.get('message')}"
        case "InputChecked":
            text = p.get("verdict", "") + (
                ": " + "; ".join(p["reasons"]) if p.get("reasons") else ""
            )
        case "RateLimitChecked":
            text = (
                "allowed"
                if p.get("allowed")
                else f"denied by {p.get('limit')}, retry after {p.get('retry_after_s')}s"
            )
        case "SentimentScored":
            text = f"{p.get('label')} {p.get('score', 0):+.2f}"
        case "RouteDecided":
            text = (
                f"→ {p.get('model')} (band {p.get('band')}, score {p.get('complexity', 0):.2f},"
                f" {p.get('reason')}; chain {' > '.join(p.get('chain', []))})"
            )
        case "ModelCalled":
            detail = f" ({p['detail']})" if p.get("detail") else ""
            text = f"{p.get('deployment')} try {p.get('attempt')}: {p.get('outcome')}{detail}"
        case "CircuitChanged":
            text = f"{p.get('deployment')}: {p.get('from_state')} → {p.get('to_state')}"
        case "RateAdjusted":
            text = f"rate factor {p.get('factor')} ({p.get('reason')})"
        case _:
            text = p.get("content") or p.get("title") or ""
    return text if len(text) <= 90 else text[:87] + "..."


def print_audit(rows: list[dict[str, Any]], context: str, fmt: str) -> None:
    if fmt == "json":
        for row in rows:
            sys.stdout.write(json.dumps(row["event"], ensure_ascii=False) + "\n")
        return
    table = Table(title=f"audit trail of context {escape(context)}", title_justify="left")
    table.add_column("ver", justify="right")
    table.add_column("type", no_wrap=True)
    table.add_column("time (UTC)", no_wrap=True)
    table.add_column("user", no_wrap=True)
    table.add_column("event id", no_wrap=True)
    table.add_column("what", overflow="fold")
    for row in rows:
        table.add_row(
            str(row["stream_version"]),
            row["type"],
            row["occurred_at"][11:23],
            escape(row["user_id"]),
            "…" + row["event_id"][-8:],
            escape(_summary(row["event"])),
        )
    out.print(table)


@audit_app.callback(invoke_without_command=True)
def audit(
    ctx: typer.Context,
    context: str | None = typer.Option(None, "--context", help="context id"),
    fmt: str = typer.Option("table", "--format", help="table, or json (one event per line)"),
    tenant: str | None = TenantOpt,
    api_key: str | None = KeyOpt,
    url: str | None = UrlOpt,
    config: Path | None = ConfigOpt,
    profile: str | None = ProfileOpt,
) -> None:
    """Print a context's events in stream order, from the archive (`audit verify`: check
    the hash chains)."""
    if ctx.invoked_subcommand is not None:
        return
    if context is None:
        err.print("[red]name a context (--context ID), or run `chatllm audit verify`[/red]")
        raise typer.Exit(2)
    if fmt not in ("table", "json"):
        err.print(f"[red]unknown format {fmt!r}: use table or json[/red]")
        raise typer.Exit(2)
    settings = _load(config, profile).settings
    rows = _fetch_audit(settings, context, tenant or settings.tenant, url, api_key)
    if not rows:
        err.print(
            f"no events archived for context {context!r} (tenant {tenant or settings.tenant})"
        )
        raise typer.Exit(1)
    print_audit(rows, context, fmt)


@audit_app.command("search")
def audit_search(
    action: list[str] = typer.Option([], "--action", help="event type (repeatable)"),
    actor: str = typer.Option("", "--actor", help="the user who acted"),
    since: str | None = SinceOpt,
    until: str | None = UntilOpt,
    context: str = typer.Option("", "--context"),
    text: str = typer.Option("", "--text", help="text anywhere in the event"),
    fmt: str = typer.Option("table", "--format", help="table, json, jsonl (as logged) or csv"),
    limit: int | None = typer.Option(None, "--limit"),
    tenant: str | None = TenantOpt,
    api_key: str | None = KeyOpt,
    url: str | None = UrlOpt,
    config: Path | None = ConfigOpt,
    profile: str | None = ProfileOpt,
) -> None:
    """Search the audit trail by action (event type), actor, time, context or text; jsonl
    and csv export any number of events (the same search as `chatllm query log`)."""
    query_log(
        types=action,
        since=since,
        until=until,
        user=actor,
        context=context,
        model="",
        text=text,
        fmt=fmt,
        limit=limit,
        tenant=tenant,
        api_key=api_key,
        url=url,
        config=config,
        profile=profile,
    )


@audit_app.command("verify")
def audit_verify(
    context: str = typer.Option("", "--context", help="one stream only"),
    fmt: str = typer.Option("table", "--format", help="table or json"),
    tenant: str | None = TenantOpt,
    api_key: str | None = KeyOpt,
    url: str | None = UrlOpt,
    config: Path | None = ConfigOpt,
    profile: str | None = ProfileOpt,
) -> None:
    """Check the tenant's archived streams against their hash chains; exit 1 on any break,
    naming the altered, missing or misplaced event."""
    try:
        result: dict[str, Any] = _get_json(
            "/v1/audit/verify",
            {"context": context},
            tenant=tenant,
            api_key=api_key,
            url=url,
            config=config,
            profile=profile,
            offline=True,
        )
    except _Unreachable:
        from infra.services.audit import verify

        settings = _load(config, profile).settings
        with _local_store(settings) as store:
            result = verify(store, tenant or settings.tenant, context)
    if fmt == "json":
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        summary = (
            f"{result['streams']} streams, {result['events']} events,"
            f" {result['unchained_streams']} unchained"
        )
        if result["ok"]:
            out.print(f"[green]audit chain holds[/green]: {summary}")
        else:
            _print_rows(
                result["breaks"],
                f"audit chain BROKEN ({summary})",
                ["stream_id", "stream_version", "event_id", "problem"],
            )
    if not result["ok"]:
        raise typer.Exit(1)


@app.command()
def forget(
    user: str = typer.Option(..., "--user", help="whose content to erase"),
    yes: bool = typer.Option(False, "--yes", help="do not ask for confirmation"),
    tenant: str | None = TenantOpt,
    api_key: str | None = KeyOpt,
    url: str | None = UrlOpt,
    config: Path | None = ConfigOpt,
    profile: str | None = ProfileOpt,
) -> None:
    """Erase a user's content from the archive and every projection (data protection);
    the audit chain still verifies, and the erasure itself is recorded."""
    if not yes and not typer.confirm(f"erase every message of user {user!r}? it cannot be undone"):
        raise typer.Exit(1)
    result: dict[str, Any] = _get_json(
        "/v1/admin/forget",
        {},
        method="POST",
        content=json.dumps({"user_id": user}).encode(),
        tenant=tenant,
        api_key=api_key,
        url=url,
        config=config,
        profile=profile,
    )
    out.print(f"erased the content of {result['erased_events']} archived events of {user}")


@app.command()
def feedback(
    context: str = typer.Argument(..., help="the context of the reply"),
    message_id: str = typer.Argument(..., help="the reply's message id (in its turn's answer)"),
    up: bool = typer.Option(False, "--up", help="thumbs up"),
    down: bool = typer.Option(False, "--down", help="thumbs down"),
    rating: int = typer.Option(0, "--rating", min=0, max=5, help="1-5"),
    reason: str = typer.Option("", "--reason", help="why, in a few words"),
    tenant: str | None = TenantOpt,
    api_key: str | None = KeyOpt,
    url: str | None = UrlOpt,
    config: Path | None = ConfigOpt,
    profile: str | None = ProfileOpt,
) -> None:
    """Give feedback on a reply: thumbs, a 1-5 rating, a reason (routing learns from it)."""
    if up and down:
        err.print("[red]--up or --down, not both[/red]")
        raise typer.Exit(2)
    where = dict(tenant=tenant, api_key=api_key, url=url, config=config, profile=profile)
    thumbs = "up" if up else "down" if down else ""
    body = {"message_id": message_id, "thumbs": thumbs, "rating": rating, "reason": reason}
    _get_json(
        f"/v1/contexts/{context}/feedback", {}, method="POST",
        content=json.dumps(body).encode(), **where,  # type: ignore[arg-type]
    )  # fmt: skip
    out.print(f"feedback on {message_id} recorded")


@app.command()
def whatif(
    policy: Path = typer.Option(..., "--policy", help="TOML: [limits], [routing], [[deployments]]"),
    since: str | None = typer.Option(None, "--from", help="from, ISO 8601 with zone"),
    until: str | None = typer.Option(None, "--to", help="to (exclusive), ISO 8601 with zone"),
    fmt: str = typer.Option("table", "--format", help="table or json"),
    tenant: str | None = TenantOpt,
    api_key: str | None = KeyOpt,
    url: str | None = UrlOpt,
    config: Path | None = ConfigOpt,
    profile: str | None = ProfileOpt,
) -> None:
    """Re-run recorded requests under another policy, without calling any model; what
    would have changed, side by side (denials, model mix, fallbacks, cost, latency)."""
    import tomllib

    try:
        document = tomllib.loads(policy.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        err.print(f"[red]cannot read the policy {str(policy)!r}: {exc}[/red]")
        raise typer.Exit(2) from None
    unknown = sorted(set(document) - {"limits", "routing", "deployments"})
    if unknown:
        err.print(f"[red]the policy has sections {unknown}; use limits, routing, deployments[/red]")
        raise typer.Exit(2)
    body = {"policy": document, "since": since, "until": until}
    report: dict[str, Any] = _get_json(
        "/v1/whatif",
        {},
        method="POST",
        content=json.dumps(body).encode(),
        tenant=tenant,
        api_key=api_key,
        url=url,
        config=config,
        profile=profile,
    )
    if fmt == "json":
        sys.stdout.write(json.dumps(report) + "\n")
        return
    recorded, counter = report["recorded"], report["whatif"]
    table = Table(title=f"what if: {policy.name}", title_justify="left")
    for column in ("", "recorded", "what if", "change"):
        table.add_column(column, justify="right" if column else "left")
    for key in ("requests", "denied", "failed", "fallbacks", "unrouted", "cost", "latency_ms_mean"):
        old, new = recorded.get(key), counter.get(key)
        delta = (
            f"{new - old:+,.4g}"
            if isinstance(old, int | float) and isinstance(new, int | float)
            else ""
        )
        table.add_row(key, _cell(old), _cell(new), delta)
    for model in sorted(set(recorded.get("models", {})) | set(counter.get("models", {}))):
        old = recorded.get("models", {}).get(model, 0)
        new = counter.get("models", {}).get(model, 0)
        table.add_row(f"model {model}", str(old), str(new), f"{new - old:+d}")
    for key, value in report.get("changed", {}).items():
        table.add_row(key.replace("_", " "), "", str(value), "")
    out.print(table)


@app.command()
def state(
    context: str = typer.Option(..., "--context", help="context id"),
    at: str = typer.Option(..., "--at", help="the moment, ISO 8601 with a zone"),
    fmt: str = typer.Option("table", "--format", help="table or json"),
    tenant: str | None = TenantOpt,
    api_key: str | None = KeyOpt,
    url: str | None = UrlOpt,
    config: Path | None = ConfigOpt,
    profile: str | None = ProfileOpt,
) -> None:
    """Time travel: a context, its limiter and router state, exactly as they were at --at."""
    if fmt not in ("table", "json"):
        err.print(f"[red]unknown format {fmt!r}: use table or json[/red]")
        raise typer.Exit(2)
    moment: dict[str, Any] = _get_json(
        f"/v1/contexts/{context}/state",
        {"at": at},
        tenant=tenant,
        api_key=api_key,
        url=url,
        config=config,
        profile=profile,
    )
    if fmt == "json":
        sys.stdout.write(json.dumps(moment, ensure_ascii=False) + "\n")
        return
    c, limiter, router = moment["context"], moment["limiter"], moment["router"]
    last = limiter["last_decision"] or {}
    _print_mapping(
        {
            "at": moment["at"],
            "version": c["version"],
            "events": moment["events"],
            "title": c["title"],
            "tags": c["tags"],
            "config": c["config"],
            "documents": [d["name"] for d in c["documents"]],
            "sticky model": router["sticky_model"],
            "last route": (router["last_route"] or {}).get("model", ""),
            "circuits": router["circuits"],
            "last rate-limit decision": (
                f"{'allowed' if last.get('allowed') else 'denied'} ({last.get('limit', '')})"
                if last
                else ""
            ),
            "decisions / denials in the hour before": (
                f"{limiter['decisions_last_hour']} / {limiter['denials_last_hour']}"
            ),
            "rate factor": limiter["rate_factor"],
        },
        f"context {context} at {moment['at']}",
    )
    table = Table(title=f"messages ({len(moment['messages'])})", title_justify="left")
    table.add_column("role")
    table.add_column("content", overflow="fold")
    for m in moment["messages"]:
        table.add_row(m["role"], escape(m["content"]))
    out.print(table)


@query_app.command("log")
def query_log(
    types: list[str] = typer.Option([], "--type", help="event type (repeatable)"),
    since: str | None = typer.Option(None, "--since", help="from, ISO 8601 with zone"),
    until: str | None = typer.Option(None, "--until", help="to (exclusive), ISO 8601 with zone"),
    user: str = typer.Option("", "--user"),
    context: str = typer.Option("", "--context"),
    model: str = typer.Option("", "--model"),
    text: str = typer.Option("", "--text", help="text anywhere in the event"),
    fmt: str = typer.Option("table", "--format", help="table, json, jsonl (as logged) or csv"),
    limit: int | None = typer.Option(None, "--limit", help="at most this many (table/json: 100)"),
    tenant: str | None = TenantOpt,
    api_key: str | None = typer.Option(None, "--api-key", envvar="CHATLLM_API_KEY"),
    url: str | None = UrlOpt,
    config: Path | None = ConfigOpt,
    profile: str | None = ProfileOpt,
) -> None:
    """Search the request log (the archive); jsonl and csv stream any number of events."""
    if fmt not in ("table", "json", "jsonl", "csv"):
        err.print(f"[red]unknown format {fmt!r}: use table, json, jsonl or csv[/red]")
        raise typer.Exit(2)
    settings = _load(config, profile).settings
    params: dict[str, Any] = {
        "type": types,
        "user": user,
        "context": context,
        "model": model,
        "q": text,
        "format": "json" if fmt == "table" else fmt,
    }
    params |= {k: v for k, v in {"since": since, "until": until, "limit": limit}.items() if v}
    headers = {"X-Tenant-Id": tenant or settings.tenant}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    base = _base_url(settings, url)
    try:
        with httpx.stream(
            "GET", f"{base}/v1/events", params=params, headers=headers, timeout=None
        ) as response:
            if response.status_code != 200:
                response.read()
                detail = response.json().get("detail", response.text)
                err.print(f"[red]{response.status_code}:[/red] {escape(str(detail))}")
                raise typer.Exit(1)
            if fmt in ("jsonl", "csv"):
                for chunk in response.iter_bytes():
                    sys.stdout.buffer.write(chunk)
                return
            response.read()
            found: list[dict[str, Any]] = response.json()
    except httpx.TransportError as exc:
        err.print(f"[red]cannot reach chat-llm at {base}:[/red] {exc} (is `chatllm up` running?)")
        raise typer.Exit(1) from None
    if fmt == "json":
        for event in found:
            sys.stdout.write(json.dumps(event["event"], ensure_ascii=False) + "\n")
        return
    table = Table(title=f"request log ({len(found)} events)", title_justify="left")
    for column in ("time (UTC)", "type", "context", "ver", "user", "what"):
        table.add_column(column, overflow="fold" if column == "what" else "ellipsis")
    for event in found:
        table.add_row(
            event["occurred_at"][:23],
            event["type"],
            escape(event["stream_id"]),
            str(event["stream_version"]),
            escape(event["user_id"]),
            escape(_summary(event["event"])),
        )
    out.print(table)


class _Unreachable(Exception):
    """The running service did not answer (the command may read the store itself)."""


@contextlib.contextmanager
def _local_store(settings: Settings) -> Iterator[Any]:
    """The configured ClickHouse opened by this process, for commands that work without a
    running service. chDB allows one process per data path: while `chatllm up` runs on it,
    this says so in one line."""
    from infra.adapters.clickhouse.store import ClickHouseStore, StoreError

    try:
        store = ClickHouseStore(settings.clickhouse).open()
        store.migrate()
    except StoreError as exc:
        err.print(f"[red]no service answers, and the store cannot be opened:[/red] {exc}")
        raise typer.Exit(1) from None
    try:
        yield store
    finally:
        store.close()


def _get_json(
    path: str,
    params: dict[str, Any],
    *,
    tenant: str | None,
    api_key: str | None,
    url: str | None,
    config: Path | None,
    profile: str | None,
    raw: bool = False,
    method: str = "GET",
    content: bytes | None = None,
    content_type: str = "application/json",
    ok: tuple[int, ...] = (200,),
    offline: bool = False,
) -> Any:
    """Call an endpoint of the running service as the caller's tenant; exits on errors.
    With `offline`, a service that does not answer (and no --url was given) raises
    _Unreachable instead, for commands that can read the embedded store themselves."""
    settings = _load(config, profile).settings
    headers = {"X-Tenant-Id": tenant or settings.tenant}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    if content is not None:
        headers["Content-Type"] = content_type
    base = _base_url(settings, url)
    try:
        response = httpx.request(
            method,
            f"{base}{path}",
            params={k: v for k, v in params.items() if v not in (None, "")},
            headers=headers,
            content=content,
            timeout=120,
        )
    except httpx.TransportError as exc:
        if offline and not url:
            raise _Unreachable(base) from None
        err.print(f"[red]cannot reach chat-llm at {base}:[/red] {exc} (is `chatllm up` running?)")
        raise typer.Exit(1) from None
    if response.status_code not in ok:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        err.print(f"[red]{response.status_code}:[/red] {escape(str(detail))}")
        raise typer.Exit(1)
    return response.text if raw else response.json()


def _check_format(fmt: str) -> None:
    if fmt not in ("table", "json", "csv"):
        err.print(f"[red]unknown format {fmt!r}: use table, json or csv[/red]")
        raise typer.Exit(2)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".")
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return "" if value is None else str(value)


def _print_rows(rows: list[dict[str, Any]], title: str, columns: list[str]) -> None:
    table = Table(title=f"{title} ({len(rows)})", title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(escape(_cell(row.get(c))) for c in columns))
    out.print(table)


def _print_mapping(data: dict[str, Any], title: str) -> None:
    table = Table(title=title, title_justify="left")
    table.add_column("what")
    table.add_column("value", overflow="fold")
    for key, value in data.items():
        if (
            isinstance(value, dict)
            and value
            and all(not isinstance(v, dict) for v in value.values())
        ):
            table.add_row(escape(key), escape(_cell(value)))
        elif isinstance(value, dict):
            for sub, v in value.items():
                table.add_row(escape(f"{key}.{sub}"), escape(_cell(v)))
        else:
            table.add_row(escape(key), escape(_cell(value)))
    out.print(table)


def _emit_list(
    path: str, params: dict[str, Any], fmt: str, title: str, columns: list[str], **where: Any
) -> None:
    _check_format(fmt)
    if fmt == "csv":
        sys.stdout.write(_get_json(path, {**params, "format": "csv"}, raw=True, **where))
        return
    rows: list[dict[str, Any]] = _get_json(path, params, **where)
    if fmt == "json":
        for row in rows:
            sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
        return
    _print_rows(rows, title, columns)


def _emit_mapping(path: str, params: dict[str, Any], fmt: str, title: str, **where: Any) -> None:
    _check_format(fmt)
    data: dict[str, Any] = _get_json(path, params, **where)
    if fmt == "json":
        sys.stdout.write(json.dumps(data, ensure_ascii=False) + "\n")
    elif fmt == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(["key", "value"])
        for key, value in data.items():
            if isinstance(value, dict):
                for sub, v in value.items():
                    writer.writerow([f"{key}.{sub}", v])
            else:
                writer.writerow([key, value])
    else:
        _print_mapping(data, title)


@query_app.command("memory")
def query_memory(
    context: str = typer.Option("", "--context", help="one context only"),
    since: str | None = SinceOpt,
    until: str | None = UntilOpt,
    limit: int = typer.Option(100, "--limit"),
    offset: int = typer.Option(0, "--offset"),
    fmt: str = FormatOpt,
    tenant: str | None = TenantOpt,
    api_key: str | None = KeyOpt,
    url: str | None = UrlOpt,
    config: Path | None = ConfigOpt,
    profile: str | None = ProfileOpt,
) -> None:
    """Conversation memory: one row per conversation, newest first."""
    params: dict[str, Any] = {"context": context, "since": since, "until": until}
    params |= {"limit": limit, "offset": offset}
    columns = [
        "started_at",
        "context_id",
        "question",
        "answer",
        "model",
        "status",
        "duration_ms",
        "completion_tokens",
        "sentiment_label",
        "tags",
    ]
    where = dict(tenant=tenant, api_key=api_key, url=url, config=config, profile=profile)
    _emit_list("/v1/memory", params, fmt, "conversation memory", columns, **where)


@query_app.command("stats")
def query_stats(
    since: str | None = SinceOpt,
    until: str | None = UntilOpt,
    fmt: str = FormatOpt,
    tenant: str | None = TenantOpt,
    api_key: str | None = KeyOpt,
    url: str | None = UrlOpt,
    config: Path | None = ConfigOpt,
    profile: str | None = ProfileOpt,
) -> None:
    """Memory statistics: total, by context, average duration, sentiment, token usage."""
    where = dict(tenant=tenant, api_key=api_key, url=url, config=config, profile=profile)
    params = {"since": since, "until": until}
    _emit_mapping("/v1/memory/stats", params, fmt, "conversation memory statistics", **where)


@query_app.command("analytics")
def query_analytics(
    since: str | None = SinceOpt,
    until: str | None = UntilOpt,
    bucket: int = typer.Option(60, "--bucket", help="bucket width in seconds"),
    conversations: bool = typer.Option(
        False, "--conversations", help="response time, satisfaction, topics, follow-ups"
    ),
    fmt: str = FormatOpt,
    tenant: str | None = TenantOpt,
    api_key: str | None = KeyOpt,
    url: str | None = UrlOpt,
    config: Path | None = ConfigOpt,
    profile: str | None = ProfileOpt,
) -> None:
    """Per-minute rollups (or --conversations: conversation analytics)."""
    where = dict(tenant=tenant, api_key=api_key, url=url, config=config, profile=profile)
    span = {"since": since, "until": until}
    if conversations:
        _emit_mapping("/v1/analytics/conversations", span, fmt, "conversation analytics", **where)
        return
    columns = [
        "bucket",
        "requests",
        "replies",
        "latency_p50_ms",
        "latency_p95_ms",
        "latency_p99_ms",
        "tokens",
        "errors",
        "errors_by_class",
        "models",
        "fallbacks",
        "denials",
        "circuit_openings",
    ]
    params: dict[str, Any] = {"since": since, "until": until, "bucket_s": bucket}
    _emit_list("/v1/analytics", params, fmt, "analytics", columns, **where)


@query_app.command("quality")
def query_quality(
    since: str | None = SinceOpt,
    until: str | None = UntilOpt,
    fmt: str = FormatOpt,
    tenant: str | None = TenantOpt,
    api_key: str | None = KeyOpt,
    url: str | None = UrlOpt,
    config: Path | None = ConfigOpt,
    profile: str | None = ProfileOpt,
) -> None:
    """Reply quality from feedback per model and topic (what learned routing optimises)."""
    where = dict(tenant=tenant, api_key=api_key, url=url, config=config, profile=profile)
    columns = ["model", "topic", "feedback", "up", "down", "avg_rating", "satisfied"]
    _emit_list("/v1/analytics/quality", {"since": since, "until": until}, fmt, "quality",
               columns, **where)  # fmt: skip


@query_app.command("anomalies")
def query_anomalies(
    since: str | None = SinceOpt,
    until: str | None = UntilOpt,
    limit: int = typer.Option(100, "--limit"),
    fmt: str = FormatOpt,
    tenant: str | None = TenantOpt,
    api_key: str | None = KeyOpt,
    url: str | None = UrlOpt,
    config: Path | None = ConfigOpt,
    profile: str | None = ProfileOpt,
) -> None:
    """What the anomaly detectors found, newest first."""
    columns = ["at", "detector", "metric", "subject", "observed", "threshold", "baseline", "detail"]
    where = dict(tenant=tenant, api_key=api_key, url=url, config=config, profile=profile)
    params: dict[str, Any] = {"since": since, "until": until, "limit": limit}
    _emit_list("/v1/anomalies", params, fmt, "anomalies", columns, **where)


@app.command()
def produce(
    source: str = typer.Argument("-", help="a file of JSON lines, or - for standard input"),
    batch: int = typer.Option(500, "--batch", min=1, help="events per request"),
    tenant: str | None = TenantOpt,
    api_key: str | None = KeyOpt,
    url: str | None = UrlOpt,
    config: Path | None = ConfigOpt,
    profile: str | None = ProfileOpt,
) -> None:
    """Ingest upstream events (JSON lines, the envelope of docs/events.schema.json)."""
    try:
        stream = sys.stdin.buffer if source == "-" else Path(source).open("rb")  # noqa: SIM115
    except OSError as exc:
        err.print(f"[red]cannot read {escape(source)}:[/red] {escape(exc.strerror or str(exc))}")
        raise typer.Exit(2) from None
    where = dict(tenant=tenant, api_key=api_key, url=url, config=config, profile=profile)
    accepted, rejected, line_no = 0, 0, 0
    with stream, Progress(console=err, transient=True) as progress:
        task = progress.add_task("producing", total=None)
        while True:
            lines = [line for line in itertools.islice(stream, batch) if line.strip()]
            if not lines:
                break
            result: dict[str, Any] = _get_json(
                "/v1/events",
                {},
                method="POST",
                content=b"\n".join(lines),
                content_type="application/x-ndjson",
                ok=(200, 422),
                **where,  # type: ignore[arg-type]
            )
            for bad in result["rejected"]:
                err.print(
                    f"line {line_no + bad['index'] + 1}: {escape(bad['reason'])}", highlight=False
                )
            accepted += result["accepted"]
            rejected += len(result["rejected"])
            line_no += len(lines)
            progress.update(task, advance=len(lines), description=f"{line_no} events")
    out.print(f"accepted {accepted}, rejected {rejected} (kept in the dead-letter topic)")
    if rejected:
        raise typer.Exit(1)


@dlq_app.command("list")
def dlq_list(
    fmt: str = typer.Option("table", "--format", help="table or json"),
    tenant: str | None = TenantOpt,
    api_key: str | None = KeyOpt,
    url: str | None = UrlOpt,
    config: Path | None = ConfigOpt,
    profile: str | None = ProfileOpt,
) -> None:
    """The dead letters: what failed validation, why, and where it came from."""
    where = dict(tenant=tenant, api_key=api_key, url=url, config=config, profile=profile)
    letters: list[dict[str, Any]] = _get_json("/v1/deadletters", {}, **where)  # type: ignore[arg-type]
    if fmt == "json":
        for letter in letters:
            sys.stdout.write(json.dumps(letter, ensure_ascii=False) + "\n")
        return
    _print_rows(
        [{**d, "id": f"{d['partition']}/{d['offset']}"} for d in letters],
        "dead letters",
        ["id", "failed_at", "processor", "source", "reason"],
    )


@dlq_app.command("show")
def dlq_show(
    letter: str = typer.Argument(..., help="partition/offset, as `dlq list` shows it"),
    tenant: str | None = TenantOpt,
    api_key: str | None = KeyOpt,
    url: str | None = UrlOpt,
    config: Path | None = ConfigOpt,
    profile: str | None = ProfileOpt,
) -> None:
    """One dead letter: its headers and the original record."""
    partition, offset = _letter_id(letter)
    where = dict(tenant=tenant, api_key=api_key, url=url, config=config, profile=profile)
    letters: list[dict[str, Any]] = _get_json("/v1/deadletters", {}, **where)  # type: ignore[arg-type]
    found = [d for d in letters if (d["partition"], d["offset"]) == (partition, offset)]
    if not found:
        err.print(f"no dead letter {letter} for this tenant")
        raise typer.Exit(1)
    sys.stdout.write(json.dumps(found[0], ensure_ascii=False, indent=2) + "\n")


@dlq_app.command("retry")
def dlq_retry(
    letter: str = typer.Argument(..., help="partition/offset, as `dlq list` shows it"),
    tenant: str | None = TenantOpt,
    api_key: str | None = KeyOpt,
    url: str | None = UrlOpt,
    config: Path | None = ConfigOpt,
    profile: str | None = ProfileOpt,
) -> None:
    """Re-drive one dead letter through ingest (it is validated again)."""
    partition, offset = _letter_id(letter)
    where = dict(tenant=tenant, api_key=api_key, url=url, config=config, profile=profile)
    result: dict[str, Any] = _get_json(
        f"/v1/deadletters/{partition}/{offset}/retry",
        {},
        method="POST",
        ok=(200, 422),
        **where,  # type: ignore[arg-type]
    )
    if result["rejected"]:
        err.print(f"rejected again: {escape(result['rejected'][0]['reason'])}")
        raise typer.Exit(1)
    out.print(f"re-driven: {letter} is queued for the log again")


def _letter_id(letter: str) -> tuple[int, int]:
    partition, _, offset = letter.partition("/")
    if not (partition.isdigit() and offset.isdigit()):
        err.print(f"[red]{letter!r} is not partition/offset (e.g. 0/12)[/red]")
        raise typer.Exit(2)
    return int(partition), int(offset)


def _rebuild_progress() -> Progress:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:,.0f} events/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err,
    )


@replay_app.command("rebuild")
def replay_rebuild(
    projection: list[str] = typer.Option(
        [], "--projection", help="facts, anomalies or prunes (repeatable)"
    ),
    everything: bool = typer.Option(False, "--all", help="every projection"),
    since: str | None = typer.Option(None, "--from", help="from, ISO 8601 with zone"),
    until: str | None = typer.Option(None, "--to", help="to (exclusive), ISO 8601 with zone"),
    source: str = typer.Option(
        "archive", "--source", help="archive (all history) or broker (what its log still holds)"
    ),
    api_key: str | None = KeyOpt,
    url: str | None = UrlOpt,
    config: Path | None = ConfigOpt,
    profile: str | None = ProfileOpt,
) -> None:
    """Rebuild projections from the archive into shadow tables, then swap them in.

    Through the running service (which keeps serving), or, when none runs, straight on
    the configured ClickHouse."""
    from datetime import datetime

    from infra.services.rebuild import PROJECTIONS, BrokerSource, RebuildError, rebuild

    chosen = sorted(PROJECTIONS) if everything else projection
    if not chosen:
        err.print("[red]name --projection (facts, anomalies, prunes) or --all[/red]")
        raise typer.Exit(2)
    settings = _load(config, profile).settings
    base = _base_url(settings, url)
    headers = {"X-Tenant-Id": settings.tenant}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    if source not in ("archive", "broker"):
        err.print(f"[red]unknown source {source!r}: use archive or broker[/red]")
        raise typer.Exit(2)
    body = {"projections": chosen, "since": since, "until": until, "source": source}
    try:
        started = httpx.post(f"{base}/v1/admin/rebuild", json=body, headers=headers, timeout=30)
    except httpx.TransportError:
        started = None
    if started is None:
        # No service: the archive is ours to read (chDB allows one process per path).
        from infra.wiring import open_store

        try:
            moments = [datetime.fromisoformat(t) if t else None for t in (since, until)]
        except ValueError as exc:
            err.print(f"[red]bad --from/--to: {exc}[/red]")
            raise typer.Exit(2) from None
        store = open_store(settings)
        try:
            with _rebuild_progress() as bar:
                task = bar.add_task("rebuilding " + ", ".join(chosen), total=None, rate=0.0)
                began = time.monotonic()

                def show(done: int, total: int) -> None:
                    rate = done / max(time.monotonic() - began, 1e-9)
                    bar.update(task, completed=done, total=total, rate=rate)

                broker = None
                if source == "broker":
                    if not settings.broker.bootstrap_servers:
                        raise RebuildError(
                            "--source broker needs broker.bootstrap_servers (the embedded"
                            " broker runs only inside `chatllm up`)"
                        )
                    broker = BrokerSource(settings.broker.bootstrap_servers, settings.topics.events)
                report = rebuild(
                    store,
                    chosen,
                    since=moments[0],
                    until=moments[1],
                    progress=show,
                    source="broker" if source == "broker" else "archive",
                    broker=broker,
                )
        except RebuildError as exc:
            err.print(f"[red]{exc}[/red]")
            raise typer.Exit(2) from None
        finally:
            store.close()
        out.print(
            f"rebuilt {', '.join(chosen)}: {report.events:,} events at {report.rate:,.0f}/s,"
            f" rows {report.rows}, skipped {report.skipped}"
        )
        return
    if started.status_code != 202:
        detail = started.json().get("detail", started.text)
        err.print(f"[red]{started.status_code}:[/red] {escape(str(detail))}")
        raise typer.Exit(1)
    job = started.json()
    with _rebuild_progress() as bar:
        task = bar.add_task("rebuilding " + ", ".join(chosen), total=None, rate=0.0)
        while job["state"] == "running":
            time.sleep(0.3)
            job = httpx.get(
                f"{base}/v1/admin/rebuild/{job['job_id']}", headers=headers, timeout=30
            ).json()
            bar.update(task, completed=job["done"], total=job["total"] or None, rate=job["rate"])
    if job["state"] == "failed":
        err.print(f"[red]rebuild failed:[/red] {escape(job['error'])}")
        raise typer.Exit(1)
    report = job["report"]
    out.print(
        f"rebuilt {', '.join(chosen)}: {report['events']:,} events at {report['rate']:,.0f}/s,"
        f" rows {report['rows']}, skipped {report['skipped']}, caught up {report['caught_up']}"
    )


@config_app.command("show")
def config_show(
    config: Path | None = ConfigOpt,
    profile: str | None = ProfileOpt,
    fmt: str = typer.Option("table", "--format", help="table or json"),
) -> None:
    """Print the effective configuration and where each value came from."""
    loaded = _load(config, profile)
    if fmt == "json":
        data = {
            k: {"value": loaded.values[k], "source": loaded.sources[k]}
            for k in sorted(loaded.values)
        }
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
        return
    table = Table(title="effective configuration")
    table.add_column("key")
    table.add_column("value")
    table.add_column("source")
    for key in sorted(loaded.values):
        source = loaded.sources[key]
        table.add_row(
            key, repr(loaded.values[key]), source if source != "default" else "[dim]default[/dim]"
        )
    out.print(table)


# ---- knowledge base ---------------------------------------------------------------


@kb_app.command("ingest")
def kb_ingest(
    source: str | None = typer.Option(None, "--source", help="one source (default: all)"),
    tenant: str | None = TenantOpt,
    api_key: str | None = KeyOpt,
    url: str | None = UrlOpt,
    config: Path | None = ConfigOpt,
    profile: str | None = ProfileOpt,
) -> None:
    """Bring the knowledge base up to date: only new, changed and removed documents."""
    where = dict(tenant=tenant, api_key=api_key, url=url, config=config, profile=profile)
    body = json.dumps({"source": source}).encode()
    with out.status("ingesting (new and changed documents are embedded) ..."):
        reports: list[dict[str, Any]] = _get_json(
            "/v1/kb/ingest",
            {},
            method="POST",
            content=body,
            **where,  # type: ignore[arg-type]
        )
    rows = [
        {**r, **{k: len(r[k]) for k in ("added", "updated", "removed", "failed")}} for r in reports
    ]
    columns = ["source", "added", "updated", "removed", "unchanged", "passages", "failed"]
    _print_rows(rows, "ingestion", columns)
    for report in reports:
        for document, why in report["failed"].items():
            err.print(f"[red]{escape(report['source'])}/{escape(document)}:[/red] {escape(why)}")
    if any(r["failed"] for r in reports):
        raise typer.Exit(1)


@kb_app.command("search")
def kb_search(
    query: str = typer.Argument(..., help="a question"),
    k: int = typer.Option(3, "-k", min=1, max=50, help="passages"),
    source: list[str] = typer.Option([], "--source", help="only these sources (repeatable)"),
    fmt: str = typer.Option("table", "--format", help="table, json or csv"),
    tenant: str | None = TenantOpt,
    api_key: str | None = KeyOpt,
    url: str | None = UrlOpt,
    config: Path | None = ConfigOpt,
    profile: str | None = ProfileOpt,
) -> None:
    """The passages closest to a question in meaning, with scores and sources."""
    where = dict(tenant=tenant, api_key=api_key, url=url, config=config, profile=profile)
    params: dict[str, Any] = {"q": query, "k": k, "source": source or None}
    columns = ["score", "source", "document", "chunk", "text"]
    if fmt == "csv":
        _check_format(fmt)
    rows: list[dict[str, Any]] = _get_json("/v1/kb/search", params, **where)  # type: ignore[arg-type]
    if fmt == "json":
        sys.stdout.write(json.dumps(rows, ensure_ascii=False) + "\n")
    elif fmt == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    else:
        _print_rows(rows, f"passages for {query!r}", columns)


@kb_app.command("list")
def kb_list(
    tenant: str | None = TenantOpt,
    api_key: str | None = KeyOpt,
    url: str | None = UrlOpt,
    config: Path | None = ConfigOpt,
    profile: str | None = ProfileOpt,
) -> None:
    """The knowledge sources and what the knowledge base holds of each."""
    where = dict(tenant=tenant, api_key=api_key, url=url, config=config, profile=profile)
    found: dict[str, Any] = _get_json("/v1/kb", {}, **where)  # type: ignore[arg-type]
    columns = ["name", "kind", "path", "documents", "passages", "last_ingested"]
    _print_rows(found["sources"], f"knowledge sources ({found['embedder']})", columns)


# ---- workflows -----------------------------------------------------------------


def _inputs(pairs: list[str], json_inputs: str | None) -> dict[str, Any]:
    """--input key=value (a JSON value, or else the text itself) and --inputs '{...}'."""
    inputs: dict[str, Any] = {}
    if json_inputs:
        try:
            inputs.update(json.loads(json_inputs))
        except (json.JSONDecodeError, TypeError) as exc:
            err.print(f"[red]--inputs is not a JSON object:[/red] {exc}")
            raise typer.Exit(2) from None
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            err.print(f"[red]--input {pair!r} is not key=value[/red]")
            raise typer.Exit(2)
        try:
            inputs[key] = json.loads(value)
        except json.JSONDecodeError:
            inputs[key] = value
    return inputs


@workflow_app.command("list")
def workflow_list(
    fmt: str = typer.Option("table", "--format", help="table or json"),
    tenant: str | None = TenantOpt,
    api_key: str | None = KeyOpt,
    url: str | None = UrlOpt,
    config: Path | None = ConfigOpt,
    profile: str | None = ProfileOpt,
) -> None:
    """The workflows the service knows, their step metrics, and its newest runs."""
    where = dict(tenant=tenant, api_key=api_key, url=url, config=config, profile=profile)
    try:
        found: dict[str, Any] = _get_json(
            "/v1/workflows",
            {},
            offline=True,
            **where,  # type: ignore[arg-type]
        )
        runs: list[dict[str, Any]] = _get_json(
            "/v1/workflows/runs",
            {"limit": 20},
            **where,  # type: ignore[arg-type]
        )
    except _Unreachable:
        from infra.http.workflows import listing
        from infra.wiring import workflow_catalog

        settings = _load(config, profile).settings
        who = tenant or settings.tenant
        with _local_store(settings) as store:
            found = listing(workflow_catalog(settings), store.workflow_metrics(who))
            runs = [
                {**r, "started_at": r["started_at"].isoformat()}
                for r in store.workflow_runs(who, "", 20)
            ]
    if fmt == "json":
        sys.stdout.write(json.dumps({**found, "runs": runs}, ensure_ascii=False) + "\n")
        return
    table = Table(title="workflows", title_justify="left")
    for column in ("name", "steps", "inputs", "source"):
        table.add_column(column, overflow="fold")
    for w in found["workflows"]:
        table.add_row(
            escape(w["name"]),
            escape(" → ".join(w["steps"])),
            escape(", ".join(w["inputs"])),
            escape(w["source"]),
        )
    out.print(table)
    metrics = [m for w in found["workflows"] for m in w["metrics"]]
    if metrics:
        columns = ["workflow", "step", "completed", "failed", "skipped", "avg_ms", "p95_ms"]
        _print_rows(metrics, "step metrics", columns)
    columns = ["run_id", "workflow", "status", "started_at", "duration_ms", "steps_completed"]
    _print_rows(runs, "newest runs", columns)
    for path, why in found["errors"].items():
        err.print(f"[red]{escape(path)}:[/red] {escape(why)}")


@workflow_app.command("run")
def workflow_run(
    name: str = typer.Argument(..., help="the workflow's name"),
    input_: list[str] = typer.Option([], "--input", "-i", help="key=value (value as JSON)"),
    inputs: str | None = typer.Option(None, "--inputs", help="all inputs as a JSON object"),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="follow the run to its end"),
    timeout: float = typer.Option(600, "--timeout", help="seconds to follow it"),
    tenant: str | None = TenantOpt,
    api_key: str | None = KeyOpt,
    url: str | None = UrlOpt,
    config: Path | None = ConfigOpt,
    profile: str | None = ProfileOpt,
) -> None:
    """Start a run; with --wait (the default) show its steps as they settle."""
    where = dict(tenant=tenant, api_key=api_key, url=url, config=config, profile=profile)
    body = json.dumps({"inputs": _inputs(input_, inputs)}).encode()
    started: dict[str, Any] = _get_json(
        f"/v1/workflows/{name}/runs",
        {},
        method="POST",
        content=body,
        ok=(202,),
        **where,  # type: ignore[arg-type]
    )
    run_id = started["run_id"]
    out.print(f"run {run_id} of {name} started", highlight=False)
    if not wait:
        return
    status = _follow(run_id, timeout, where)
    _print_run(status)
    if status["status"] != "completed":
        raise typer.Exit(1)


def _follow(run_id: str, timeout: float, where: dict[str, Any]) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {"status": "running", "steps": []}
    with Progress(console=err, transient=True) as progress:
        task = progress.add_task("waiting for the runner", total=None)
        while time.monotonic() < deadline:
            found = _get_json(f"/v1/workflows/runs/{run_id}", {}, ok=(200, 404), **where)
            if "steps" in found:
                status = found
                settled = sum(
                    s["status"] in ("completed", "skipped", "failed") for s in found["steps"]
                )
                progress.update(
                    task,
                    total=len(found["steps"]),
                    completed=settled,
                    description=f"{found['workflow']}: {settled}/{len(found['steps'])} steps",
                )
                if found["status"] != "running":
                    return status
            time.sleep(0.3)
    err.print(f"[yellow]run {run_id} still running after {timeout:.0f} s[/yellow]")
    return status


def _print_run(status: dict[str, Any]) -> None:
    colour = {"completed": "green", "failed": "red"}.get(status["status"], "yellow")
    out.print(
        f"[bold]{escape(status.get('workflow', ''))}[/bold] run {status.get('run_id', '')}:"
        f" [{colour}]{status['status']}[/{colour}]"
        + (f" ({escape(status['error'])})" if status.get("error") else "")
    )
    rows = [
        {**s, "output": s["output"] if s["status"] == "completed" else s["error"] or s["reason"]}
        for s in status["steps"]
    ]
    columns = ["step", "status", "iterations", "attempts", "duration_ms", "output"]
    _print_rows(rows, "steps", columns)


@workflow_app.command("status")
def workflow_status(
    run_id: str = typer.Argument(..., help="the run id `workflow run` printed"),
    fmt: str = typer.Option("table", "--format", help="table or json"),
    events: bool = typer.Option(False, "--events", help="also the run's events"),
    tenant: str | None = TenantOpt,
    api_key: str | None = KeyOpt,
    url: str | None = UrlOpt,
    config: Path | None = ConfigOpt,
    profile: str | None = ProfileOpt,
) -> None:
    """A run's steps: status, iterations, attempts, duration and output."""
    where = dict(tenant=tenant, api_key=api_key, url=url, config=config, profile=profile)
    status: dict[str, Any] = _get_json(
        f"/v1/workflows/runs/{run_id}",
        {"events": events or None},
        **where,  # type: ignore[arg-type]
    )
    if fmt == "json":
        sys.stdout.write(json.dumps(status, ensure_ascii=False, default=str) + "\n")
        return
    _print_run(status)
    if events:
        for event in status["events"]:
            out.print(
                f"{event['stream_version']:>4} {event['type']:<22} "
                f"{escape(json.dumps(event['payload'], default=str)[:120])}",
                highlight=False,
            )


@config_app.command("use")
def config_use(
    profile: str = typer.Argument(..., help="a profile of the service's config file ('' for none)"),
    fmt: str = typer.Option("table", "--format", help="table or json"),
    tenant: str | None = TenantOpt,
    api_key: str | None = KeyOpt,
    url: str | None = UrlOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """Switch the running service to another profile; shows what changed and what needs a
    restart. The switch is recorded as a ConfigChanged event."""
    where = dict(tenant=tenant, api_key=api_key, url=url, config=config, profile=None)
    body = json.dumps({"profile": profile}).encode()
    result: dict[str, Any] = _get_json(
        "/v1/admin/config",
        {},
        method="POST",
        content=body,
        **where,  # type: ignore[arg-type]
    )
    if fmt == "json":
        sys.stdout.write(json.dumps(result, default=str) + "\n")
        return
    before, after = result["profile_before"] or "(none)", result["profile_after"] or "(none)"
    table = Table(title=f"profile {before} → {after}", title_justify="left")
    for column in ("key", "before", "after", "effect"):
        table.add_column(column, overflow="fold")
    for change in result["changes"]:
        live = change["key"] in result["applied"]
        table.add_row(
            escape(change["key"]),
            escape(_cell(change["before"])),
            escape(_cell(change["after"])),
            "[green]applied[/green]" if live else "[yellow]at next start[/yellow]",
        )
    out.print(table)


# ---- demo ----------------------------------------------------------------------

DEMO_SCRIPT = [
    ("alice", "Hello! Can you help me plan a trip to Lisbon?"),
    ("alice", "What should I see on the first day?"),
    ("bob", "Explain event sourcing in one sentence."),
    ("alice", "And where should I eat in the evening?"),
    ("bob", "Why is the log the source of truth?"),
]


@app.command()
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
