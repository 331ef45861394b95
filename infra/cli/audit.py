"""`chatllm audit`: a context's events, a search over the audit trail, and verify."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import msgspec
import typer

from infra.cli.common import (
    Service,
    SinceOpt,
    UntilOpt,
    _get_json,
    _load,
    _local_store,
    _print_rows,
    _Unreachable,
    err,
    out,
    print_audit,
    service_options,
)
from infra.cli.query import query_log
from infra.config import Settings

audit_app = typer.Typer(help="The audit trail: a context's events, and verify.")


def _fetch_audit(
    settings: Settings,
    context: str,
    tenant: str,
    url: str | None,
    api_key: str | None = None,
    config: Path | None = None,
    profile: str | None = None,
) -> list[dict[str, Any]]:
    """From the running service if it answers, else straight from the store (embedded path)."""
    try:
        result: list[dict[str, Any]] = _get_json(
            f"/v1/contexts/{context}/events", {}, tenant=tenant, api_key=api_key, url=url,
            config=config, profile=profile, offline=True,
        )  # fmt: skip
        return result
    except _Unreachable:
        pass

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
                "logged": r.body,
            }
            for r in store.stream_events(tenant, context)
        ]


@audit_app.callback(invoke_without_command=True)
@service_options
def audit(
    ctx: typer.Context,
    context: str | None = typer.Option(None, "--context", help="context id"),
    fmt: str = typer.Option("table", "--format", help="table, or json (one event per line)"),
    *,
    service: Service,
) -> None:
    """Print a context's events in stream order, from the archive (`audit verify`: check
    the hash chains)."""
    tenant, api_key, url, config, profile = service
    if ctx.invoked_subcommand is not None:
        return
    if context is None:
        err.print("[red]name a context (--context ID), or run `chatllm audit verify`[/red]")
        raise typer.Exit(2)
    if fmt not in ("table", "json"):
        err.print(f"[red]unknown format {fmt!r}: use table or json[/red]")
        raise typer.Exit(2)
    settings = _load(config, profile).settings
    rows = _fetch_audit(settings, context, tenant or settings.tenant, url, api_key, config, profile)
    if not rows:
        err.print(
            f"no events archived for context {context!r} (tenant {tenant or settings.tenant})"
        )
        raise typer.Exit(1)
    print_audit(rows, context, fmt)


@audit_app.command("search")
@service_options
def audit_search(
    action: list[str] = typer.Option([], "--action", help="event type (repeatable)"),
    actor: str = typer.Option("", "--actor", help="the user who acted"),
    since: str | None = SinceOpt,
    until: str | None = UntilOpt,
    context: str = typer.Option("", "--context"),
    text: str = typer.Option("", "--text", help="text anywhere in the event"),
    fmt: str = typer.Option("table", "--format", help="table, json, jsonl (as logged) or csv"),
    limit: int | None = typer.Option(None, "--limit"),
    *,
    service: Service,
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
        **service.where(),
    )


@audit_app.command("verify")
@service_options
def audit_verify(
    context: str = typer.Option("", "--context", help="one stream only"),
    fmt: str = typer.Option("table", "--format", help="table or json"),
    *,
    service: Service,
) -> None:
    """Check the tenant's archived streams against their hash chains; exit 1 on any break,
    naming the altered, missing or misplaced event."""
    tenant, config, profile = service.tenant, service.config, service.profile
    try:
        result: dict[str, Any] = _get_json(
            "/v1/audit/verify",
            {"context": context},
            **service.where(),
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
