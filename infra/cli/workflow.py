"""`chatllm workflow`: list the workflows, run one, follow a run."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import typer
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from infra.cli.common import (
    Service,
    _get_json,
    _load,
    _local_store,
    _print_rows,
    _Unreachable,
    err,
    out,
    service_options,
)

workflow_app = typer.Typer(
    help="Workflows: list them, run one, follow a run.", no_args_is_help=True
)


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
@service_options
def workflow_list(
    fmt: str = typer.Option("table", "--format", help="table or json"),
    *,
    service: Service,
) -> None:
    """The workflows the service knows, their step metrics, and its newest runs."""
    tenant, config, profile = service.tenant, service.config, service.profile
    where = service.where()
    try:
        found: dict[str, Any] = _get_json(
            "/v1/workflows",
            {},
            offline=True,
            **where,
        )
        runs: list[dict[str, Any]] = _get_json(
            "/v1/workflows/runs",
            {"limit": 20},
            **where,
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
@service_options
def workflow_run(
    name: str = typer.Argument(..., help="the workflow's name"),
    input_: list[str] = typer.Option([], "--input", "-i", help="key=value (value as JSON)"),
    inputs: str | None = typer.Option(None, "--inputs", help="all inputs as a JSON object"),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="follow the run to its end"),
    timeout: float = typer.Option(600, "--timeout", help="seconds to follow it"),
    *,
    service: Service,
) -> None:
    """Start a run; with --wait (the default) show its steps as they settle."""
    where = service.where()
    body = json.dumps({"inputs": _inputs(input_, inputs)}).encode()
    started: dict[str, Any] = _get_json(
        f"/v1/workflows/{name}/runs",
        {},
        method="POST",
        content=body,
        ok=(202,),
        **where,
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
@service_options
def workflow_status(
    run_id: str = typer.Argument(..., help="the run id `workflow run` printed"),
    fmt: str = typer.Option("table", "--format", help="table or json"),
    events: bool = typer.Option(False, "--events", help="also the run's events"),
    *,
    service: Service,
) -> None:
    """A run's steps: status, iterations, attempts, duration and output."""
    where = service.where()
    status: dict[str, Any] = _get_json(
        f"/v1/workflows/runs/{run_id}",
        {"events": events or None},
        **where,
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
