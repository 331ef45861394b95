"""What every command shares: the options, loading the config, the console, and the one way
of asking the running service (_get_json, falling back to the store where it can)."""

from __future__ import annotations

import contextlib
import csv
import functools
import inspect
import json
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from infra.config import ConfigError, LoadedConfig, Settings, load_config

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


# One pair of names on every command that takes a time range: --since/--until, with
# --from/--to accepted as the same.
SinceOpt = typer.Option(None, "--since", "--from", help="from, ISO 8601 with zone")


UntilOpt = typer.Option(None, "--until", "--to", help="to (exclusive), ISO 8601 with zone")


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


def _run(coroutine: Any) -> Any:
    """Run on uvloop (uvicorn would pick it too, but we start the loop ourselves)."""
    import uvloop

    return uvloop.run(coroutine)


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
    stream_to: BinaryIO | None = None,
) -> Any:
    """Call an endpoint of the running service as the caller's tenant; exits on errors. The
    one way every command asks the service. With `offline`, a service that does not answer
    (and no --url was given) raises _Unreachable instead, for commands that can read the
    embedded store themselves; with `stream_to`, the body is copied there as it comes (an
    export of any size), and nothing is returned."""
    settings = _load(config, profile).settings
    headers = {"X-Tenant-Id": tenant or settings.tenant}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    if content is not None:
        headers["Content-Type"] = content_type
    base = _base_url(settings, url)
    try:
        with httpx.stream(
            method,
            f"{base}{path}",
            params={k: v for k, v in params.items() if v not in (None, "")},
            headers=headers,
            content=content,
            timeout=None if stream_to is not None else 120,
        ) as response:
            if response.status_code not in ok:
                response.read()
                try:
                    detail = response.json().get("detail", response.text)
                except ValueError:
                    detail = response.text
                err.print(f"[red]{response.status_code}:[/red] {escape(str(detail))}")
                raise typer.Exit(1)
            if stream_to is not None:
                for chunk in response.iter_bytes():
                    stream_to.write(chunk)
                return None
            response.read()
    except httpx.TransportError as exc:
        if offline and not url:
            raise _Unreachable(base) from None
        err.print(f"[red]cannot reach chat-llm at {base}:[/red] {exc} (is `chatllm up` running?)")
        raise typer.Exit(1) from None
    return response.text if raw else response.json()


def _check_format(fmt: str) -> None:
    if fmt not in ("table", "json", "csv"):
        err.print(f"[red]unknown format {fmt!r}: use table, json or csv[/red]")
        raise typer.Exit(2)


def _cell(value: Any, none: str = "") -> str:
    """A value as a table shows it; `none`: what stands for a missing one."""
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".")
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return none if value is None else str(value)


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
        for row in rows:  # the bytes as logged, not a re-serialisation
            sys.stdout.write(row["logged"] + "\n")
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


class Service(NamedTuple):
    """Where a command finds the running service and as whom it asks: --tenant, --api-key,
    --url, --config and --profile, which service_options gives a command."""

    tenant: str | None = None
    api_key: str | None = None
    url: str | None = None
    config: Path | None = None
    profile: str | None = None

    def where(self) -> dict[str, Any]:
        """The keyword arguments of _get_json, _emit_list and _emit_mapping."""
        return self._asdict()


_SERVICE_OPTIONS = (
    ("tenant", TenantOpt, str | None),
    ("api_key", KeyOpt, str | None),
    ("url", UrlOpt, str | None),
    ("config", ConfigOpt, Path | None),
    ("profile", ProfileOpt, str | None),
)


def service_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Gives a command the five options that say where the service is and as whom to ask
    (once, here, rather than in every command's signature); the command receives them as
    its keyword-only `service` (a Service). Typer reads the signature this sets."""
    signature = inspect.signature(command)
    kept = [p for p in signature.parameters.values() if p.name != "service"]
    added = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
        for name, option, kind in _SERVICE_OPTIONS
    ]

    @functools.wraps(command)
    def with_service(*args: Any, **kwargs: Any) -> Any:
        service = Service(**{name: kwargs.pop(name, None) for name, _, _ in _SERVICE_OPTIONS})
        return command(*args, service=service, **kwargs)

    with_service.__signature__ = signature.replace(parameters=kept + added)  # type: ignore[attr-defined]
    with_service.__annotations__ = {
        **{k: v for k, v in command.__annotations__.items() if k != "service"},
        **{name: kind for name, _, kind in _SERVICE_OPTIONS},
    }
    return with_service
