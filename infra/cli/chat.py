"""Talking to the service: `chat`, `key`, `forget`, `feedback`, `whatif`, `state`, `produce`."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from infra.cli.common import (
    ConfigOpt,
    ProfileOpt,
    Service,
    SinceOpt,
    TenantOpt,
    UntilOpt,
    UrlOpt,
    _base_url,
    _cell,
    _get_json,
    _load,
    _print_mapping,
    err,
    out,
    service_options,
)

commands = typer.Typer()
"""Top-level commands; main.py adds them to the `chatllm` app."""


@commands.command()
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


@commands.command()
@service_options
def forget(
    user: str = typer.Option(..., "--user", help="whose content to erase"),
    yes: bool = typer.Option(False, "--yes", help="do not ask for confirmation"),
    *,
    service: Service,
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
        **service.where(),
    )
    out.print(f"erased the content of {result['erased_events']} archived events of {user}")


@commands.command()
@service_options
def feedback(
    context: str = typer.Argument(..., help="the context of the reply"),
    message_id: str = typer.Argument(..., help="the reply's message id (in its turn's answer)"),
    up: bool = typer.Option(False, "--up", help="thumbs up"),
    down: bool = typer.Option(False, "--down", help="thumbs down"),
    rating: int = typer.Option(0, "--rating", min=0, max=5, help="1-5"),
    reason: str = typer.Option("", "--reason", help="why, in a few words"),
    *,
    service: Service,
) -> None:
    """Give feedback on a reply: thumbs, a 1-5 rating, a reason (routing learns from it)."""
    if up and down:
        err.print("[red]--up or --down, not both[/red]")
        raise typer.Exit(2)
    where = service.where()
    thumbs = "up" if up else "down" if down else ""
    body = {"message_id": message_id, "thumbs": thumbs, "rating": rating, "reason": reason}
    _get_json(
        f"/v1/contexts/{context}/feedback", {}, method="POST",
        content=json.dumps(body).encode(), **where,
    )  # fmt: skip
    out.print(f"feedback on {message_id} recorded")


@commands.command()
@service_options
def whatif(
    policy: Path = typer.Option(
        ..., "--policy", help=r"TOML: \[limits], \[routing], \[\[deployments]]"
    ),
    since: str | None = SinceOpt,
    until: str | None = UntilOpt,
    fmt: str = typer.Option("table", "--format", help="table or json"),
    *,
    service: Service,
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
        **service.where(),
    )
    if fmt == "json":
        sys.stdout.write(json.dumps(report) + "\n")
        return
    recorded, counter = report["recorded"], report["whatif"]
    table = Table(title=f"what if: {policy.name}", title_justify="left")
    for column in ("", "recorded", "what if", "change"):
        table.add_column(column, justify="right" if column else "left")
    keys = ("requests", "denied", "failed", "fallbacks", "unrouted", "cost", "latency_ms_mean")
    for key in (*keys, "latency_unknown"):
        old, new = recorded.get(key), counter.get(key)
        delta = (
            f"{new - old:+,.4g}"
            if isinstance(old, int | float) and isinstance(new, int | float)
            else ""
        )
        table.add_row(key, _cell(old, "unknown"), _cell(new, "unknown"), delta)
    for model in sorted(set(recorded.get("models", {})) | set(counter.get("models", {}))):
        old = recorded.get("models", {}).get(model, 0)
        new = counter.get("models", {}).get(model, 0)
        table.add_row(f"model {model}", str(old), str(new), f"{new - old:+d}")
    for key, value in report.get("changed", {}).items():
        table.add_row(key.replace("_", " "), "", str(value), "")
    out.print(table)


@commands.command()
@service_options
def state(
    context: str = typer.Option(..., "--context", help="context id"),
    at: str = typer.Option(..., "--at", help="the moment, ISO 8601 with a zone"),
    fmt: str = typer.Option("table", "--format", help="table or json"),
    *,
    service: Service,
) -> None:
    """Time travel: a context, its limiter and router state, exactly as they were at --at."""
    if fmt not in ("table", "json"):
        err.print(f"[red]unknown format {fmt!r}: use table or json[/red]")
        raise typer.Exit(2)
    moment: dict[str, Any] = _get_json(
        f"/v1/contexts/{context}/state",
        {"at": at},
        **service.where(),
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


@commands.command()
@service_options
def produce(
    source: str = typer.Argument("-", help="a file of JSON lines, or - for standard input"),
    batch: int = typer.Option(500, "--batch", min=1, help="events per request"),
    *,
    service: Service,
) -> None:
    """Ingest upstream events (JSON lines, the envelope of docs/events.schema.json)."""
    try:
        stream = sys.stdin.buffer if source == "-" else Path(source).open("rb")  # noqa: SIM115
    except OSError as exc:
        err.print(f"[red]cannot read {escape(source)}:[/red] {escape(exc.strerror or str(exc))}")
        raise typer.Exit(2) from None
    where = service.where()
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
                **where,
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
