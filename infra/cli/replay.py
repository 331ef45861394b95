"""`chatllm replay`: re-run the log (rebuild projections)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.markup import escape
from rich.progress import Progress

from infra.cli.common import (
    ConfigOpt,
    KeyOpt,
    ProfileOpt,
    SinceOpt,
    UntilOpt,
    UrlOpt,
    _get_json,
    _load,
    _Unreachable,
    err,
    out,
)

replay_app = typer.Typer(help="Re-run the log: rebuild projections.", no_args_is_help=True)


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
    since: str | None = SinceOpt,
    until: str | None = UntilOpt,
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
    where = dict(tenant=None, api_key=api_key, url=url, config=config, profile=profile)
    if source not in ("archive", "broker"):
        err.print(f"[red]unknown source {source!r}: use archive or broker[/red]")
        raise typer.Exit(2)
    body = {"projections": chosen, "since": since, "until": until, "source": source}
    try:
        job = _get_json(
            "/v1/admin/rebuild", {}, method="POST", content=json.dumps(body).encode(),
            ok=(202,), offline=True, **where,  # type: ignore[arg-type]
        )  # fmt: skip
    except _Unreachable:
        job = None
    if job is None:
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
    with _rebuild_progress() as bar:
        task = bar.add_task("rebuilding " + ", ".join(chosen), total=None, rate=0.0)
        while job["state"] == "running":
            time.sleep(0.3)
            job = _get_json(f"/v1/admin/rebuild/{job['job_id']}", {}, **where)  # type: ignore[arg-type]
            bar.update(task, completed=job["done"], total=job["total"] or None, rate=job["rate"])
    if job["state"] == "failed":
        err.print(f"[red]rebuild failed:[/red] {escape(job['error'])}")
        raise typer.Exit(1)
    report = job["report"]
    out.print(
        f"rebuilt {', '.join(chosen)}: {report['events']:,} events at {report['rate']:,.0f}/s,"
        f" rows {report['rows']}, skipped {report['skipped']}, caught up {report['caught_up']}"
    )
