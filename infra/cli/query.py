"""`chatllm query`: the projections of the running service (log, memory, stats, analytics,
quality, anomalies)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from infra.cli.common import (
    ConfigOpt,
    FormatOpt,
    ProfileOpt,
    Service,
    SinceOpt,
    TenantOpt,
    UntilOpt,
    UrlOpt,
    _emit_list,
    _emit_mapping,
    _get_json,
    _print_rows,
    _summary,
    err,
    out,
    service_options,
)

query_app = typer.Typer(help="Query the projections of the running service.", no_args_is_help=True)


@query_app.command("log")
def query_log(
    types: list[str] = typer.Option([], "--type", help="event type (repeatable)"),
    since: str | None = SinceOpt,
    until: str | None = UntilOpt,
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
    params: dict[str, Any] = {
        "type": types,
        "user": user,
        "context": context,
        "model": model,
        "q": text,
        "format": "json" if fmt == "table" else fmt,
    }
    params |= {k: v for k, v in {"since": since, "until": until, "limit": limit}.items() if v}
    where = dict(tenant=tenant, api_key=api_key, url=url, config=config, profile=profile)
    if fmt in ("jsonl", "csv"):
        _get_json("/v1/events", params, stream_to=sys.stdout.buffer, **where)  # type: ignore[arg-type]
        return
    found: list[dict[str, Any]] = _get_json("/v1/events", params, **where)  # type: ignore[arg-type]
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


@query_app.command("memory")
@service_options
def query_memory(
    context: str = typer.Option("", "--context", help="one context only"),
    since: str | None = SinceOpt,
    until: str | None = UntilOpt,
    limit: int = typer.Option(100, "--limit"),
    offset: int = typer.Option(0, "--offset"),
    fmt: str = FormatOpt,
    *,
    service: Service,
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
    where = service.where()
    _emit_list("/v1/memory", params, fmt, "conversation memory", columns, **where)


@query_app.command("stats")
@service_options
def query_stats(
    since: str | None = SinceOpt,
    until: str | None = UntilOpt,
    fmt: str = FormatOpt,
    *,
    service: Service,
) -> None:
    """Memory statistics: total, by context, average duration, sentiment, token usage."""
    where = service.where()
    params = {"since": since, "until": until}
    _emit_mapping("/v1/memory/stats", params, fmt, "conversation memory statistics", **where)


@query_app.command("analytics")
@service_options
def query_analytics(
    since: str | None = SinceOpt,
    until: str | None = UntilOpt,
    bucket: int = typer.Option(60, "--bucket", help="bucket width in seconds"),
    conversations: bool = typer.Option(
        False, "--conversations", help="response time, satisfaction, topics, follow-ups"
    ),
    fmt: str = FormatOpt,
    *,
    service: Service,
) -> None:
    """Per-minute rollups (or --conversations: conversation analytics)."""
    where = service.where()
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
        "sentiment",
    ]
    params: dict[str, Any] = {"since": since, "until": until, "bucket_s": bucket}
    _emit_list("/v1/analytics", params, fmt, "analytics", columns, **where)


@query_app.command("quality")
@service_options
def query_quality(
    since: str | None = SinceOpt,
    until: str | None = UntilOpt,
    fmt: str = FormatOpt,
    *,
    service: Service,
) -> None:
    """Reply quality from feedback per model and topic (what learned routing optimises)."""
    where = service.where()
    columns = ["model", "topic", "feedback", "up", "down", "avg_rating", "satisfied"]
    _emit_list("/v1/analytics/quality", {"since": since, "until": until}, fmt, "quality",
               columns, **where)  # fmt: skip


@query_app.command("anomalies")
@service_options
def query_anomalies(
    since: str | None = SinceOpt,
    until: str | None = UntilOpt,
    limit: int = typer.Option(100, "--limit"),
    fmt: str = FormatOpt,
    *,
    service: Service,
) -> None:
    """What the anomaly detectors found, newest first."""
    columns = ["at", "detector", "metric", "subject", "observed", "threshold", "baseline", "detail"]
    where = service.where()
    params: dict[str, Any] = {"since": since, "until": until, "limit": limit}
    _emit_list("/v1/anomalies", params, fmt, "anomalies", columns, **where)


sql_commands = typer.Typer()


@sql_commands.command("sql")
@service_options
def sql(
    query: str = typer.Argument(
        ..., help='one SELECT, e.g. "SELECT type, count() FROM chatllm.events GROUP BY type"'
    ),
    limit: int = typer.Option(1000, "--limit", min=1, max=10_000, help="rows at most"),
    fmt: str = FormatOpt,
    *,
    service: Service,
) -> None:
    """Run your own SELECT over the store through the service: read-only, and only your
    tenant's rows (chatllm.events, chatllm.facts, chatllm.anomalies, chatllm.memory_prunes)."""
    body = json.dumps({"query": query, "limit": limit}).encode()
    found: dict[str, Any] = _get_json("/v1/sql", {}, method="POST", content=body, **service.where())
    columns, rows = found["columns"], found["rows"]
    if fmt == "json":
        for row in rows:
            sys.stdout.write(
                json.dumps(dict(zip(columns, row, strict=True)), ensure_ascii=False) + "\n"
            )
    elif fmt == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        writer.writerows(rows)
    else:
        _print_rows([dict(zip(columns, row, strict=True)) for row in rows], "rows", columns)
    if found["truncated"]:
        err.print(f"[yellow]only the first {limit} rows (--limit)[/yellow]")
