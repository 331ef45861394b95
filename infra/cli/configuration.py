"""`chatllm config`: show the configuration, switch a running service's profile."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from infra.cli.common import (
    ConfigOpt,
    KeyOpt,
    ProfileOpt,
    TenantOpt,
    UrlOpt,
    _cell,
    _get_json,
    _load,
    out,
)
from infra.config import masked

config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)


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
            k: {"value": masked(k, loaded.values[k]), "source": loaded.sources[k]}
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
            key,
            escape(repr(masked(key, loaded.values[key]))),
            source if source != "default" else "[dim]default[/dim]",
        )
    out.print(table)


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
    refused = {r["key"]: r["plugins"] for r in result.get("refused", [])}
    for change in result["changes"]:
        key = change["key"]
        if key in refused:
            why = "; ".join(f"{name}: {reason}" for name, reason in refused[key].items())
            effect = f"[red]refused[/red] ({escape(why)})"
        elif key in result["applied"]:
            effect = "[green]applied[/green]"
        else:
            effect = "[yellow]at next start[/yellow]"
        table.add_row(
            escape(key), escape(_cell(change["before"])), escape(_cell(change["after"])), effect
        )
    out.print(table)
