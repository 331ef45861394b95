"""`chatllm kb`: the knowledge base: ingest, search, list."""

from __future__ import annotations

import csv
import json
import sys
from typing import Any

import typer
from rich.markup import escape

from infra.cli.common import (
    Service,
    _check_format,
    _get_json,
    _print_rows,
    err,
    out,
    service_options,
)

kb_app = typer.Typer(help="The knowledge base: ingest, search, list.", no_args_is_help=True)


@kb_app.command("ingest")
@service_options
def kb_ingest(
    source: str | None = typer.Option(None, "--source", help="one source (default: all)"),
    fmt: str = typer.Option("table", "--format", help="table or json (one report per line)"),
    *,
    service: Service,
) -> None:
    """Bring the knowledge base up to date: only new, changed and removed documents."""
    where = service.where()
    body = json.dumps({"source": source}).encode()
    with out.status("ingesting (new and changed documents are embedded) ..."):
        reports: list[dict[str, Any]] = _get_json(
            "/v1/kb/ingest",
            {},
            method="POST",
            content=body,
            **where,
        )
    rows = [
        {**r, **{k: len(r[k]) for k in ("added", "updated", "removed", "failed")}} for r in reports
    ]
    if fmt == "json":
        for row in rows:
            sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
    else:
        columns = ["source", "added", "updated", "removed", "unchanged", "passages", "failed"]
        _print_rows(rows, "ingestion", columns)
    for report in reports:
        for document, why in report["failed"].items():
            err.print(f"[red]{escape(report['source'])}/{escape(document)}:[/red] {escape(why)}")
    if any(r["failed"] for r in reports):
        raise typer.Exit(1)


@kb_app.command("search")
@service_options
def kb_search(
    query: str = typer.Argument(..., help="a question"),
    k: int = typer.Option(3, "-k", min=1, max=50, help="passages"),
    source: list[str] = typer.Option([], "--source", help="only these sources (repeatable)"),
    fmt: str = typer.Option("table", "--format", help="table, json or csv"),
    *,
    service: Service,
) -> None:
    """The passages closest to a question in meaning, with scores and sources."""
    where = service.where()
    params: dict[str, Any] = {"q": query, "k": k, "source": source or None}
    columns = ["score", "source", "document", "chunk", "text"]
    if fmt == "csv":
        _check_format(fmt)
    rows: list[dict[str, Any]] = _get_json("/v1/kb/search", params, **where)
    if fmt == "json":
        sys.stdout.write(json.dumps(rows, ensure_ascii=False) + "\n")
    elif fmt == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    else:
        _print_rows(rows, f"passages for {query!r}", columns)


@kb_app.command("list")
@service_options
def kb_list(
    *,
    service: Service,
) -> None:
    """The knowledge sources and what the knowledge base holds of each."""
    where = service.where()
    found: dict[str, Any] = _get_json("/v1/kb", {}, **where)
    columns = ["name", "kind", "path", "documents", "passages", "last_ingested"]
    _print_rows(found["sources"], f"knowledge sources ({found['embedder']})", columns)
