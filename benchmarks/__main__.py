"""Run every benchmark and print one table: measurement, baseline from the same run, ratio."""

from __future__ import annotations

import logging
import sys

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from benchmarks import (
    bench_archive,
    bench_codec,
    bench_gateway,
    bench_knowledge,
    bench_log,
    bench_replay,
    bench_upstream,
)
from benchmarks.common import Result

SUITES = {
    "codec": bench_codec.run,
    "log": bench_log.run,
    "archive": bench_archive.run,
    "gateway": bench_gateway.run,
    "upstream": bench_upstream.run,
    "replay": bench_replay.run,
    "knowledge": bench_knowledge.run,
}


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING)
    chosen = argv or list(SUITES)
    unknown = [name for name in chosen if name not in SUITES]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {list(SUITES)}", file=sys.stderr)
        return 2
    console = Console(width=None if sys.stdout.isatty() else 150)
    results: list[Result] = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("benchmarks", total=len(chosen))
        for name in chosen:
            progress.update(task, description=f"running {name}")
            results.extend(SUITES[name]())
            progress.advance(task)
    table = Table(title="chat-llm benchmarks (baseline measured in the same run)")
    for column in ("benchmark", "measured", "baseline", "ratio", "target", "note"):
        table.add_column(column, justify="right" if column in ("measured", "ratio") else "left")
    for r in results:
        target = ""
        if r.target is not None:
            sign = ">=" if r.higher_is_better else "<="
            verdict = "[green]met[/green]" if r.meets_target else "[red]MISSED[/red]"
            target = f"{sign} {r.target:,g} {r.unit}: {verdict}"
        table.add_row(
            r.name,
            f"{r.value:,.1f} {r.unit}",
            f"{r.baseline:,.1f} {r.unit} ({r.baseline_name})",
            f"{r.ratio:.2f}",
            target,
            r.note,
        )
    console.print(table)
    missed = [r.name for r in results if not r.meets_target]
    if missed:
        console.print("[red]targets missed:[/red] " + "; ".join(missed))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
