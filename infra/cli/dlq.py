"""`chatllm dlq`: the dead-letter topic: list, show, retry."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer
from rich.markup import escape

from infra.cli.common import Service, _get_json, _print_rows, err, out, service_options

dlq_app = typer.Typer(help="The dead-letter topic: list, show, retry.", no_args_is_help=True)


LetterArg = typer.Argument(..., help="partition/offset, as `dlq list` shows it")


@dlq_app.command("list")
@service_options
def dlq_list(
    fmt: str = typer.Option("table", "--format", help="table or json"),
    *,
    service: Service,
) -> None:
    """The dead letters: what failed validation, why, and where it came from."""
    where = service.where()
    letters: list[dict[str, Any]] = _get_json("/v1/deadletters", {}, **where)
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
@service_options
def dlq_show(
    letter: str = LetterArg,
    *,
    service: Service,
) -> None:
    """One dead letter: its headers and the original record."""
    partition, offset = _letter_id(letter)
    where = service.where()
    letters: list[dict[str, Any]] = _get_json("/v1/deadletters", {}, **where)
    found = [d for d in letters if (d["partition"], d["offset"]) == (partition, offset)]
    if not found:
        err.print(f"no dead letter {letter} for this tenant")
        raise typer.Exit(1)
    sys.stdout.write(json.dumps(found[0], ensure_ascii=False, indent=2) + "\n")


@dlq_app.command("retry")
@service_options
def dlq_retry(
    letter: str = LetterArg,
    *,
    service: Service,
) -> None:
    """Re-drive one dead letter through ingest (it is validated again)."""
    partition, offset = _letter_id(letter)
    where = service.where()
    result: dict[str, Any] = _get_json(
        f"/v1/deadletters/{partition}/{offset}/retry",
        {},
        method="POST",
        ok=(200, 422),
        **where,
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
