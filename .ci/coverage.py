"""Branch coverage per package after `make test`, and the floors CI holds it to.

Reads the combined coverage data (pytest-cov writes it; the processes the tests start add
theirs), prints a table per package and the least-covered modules, and exits 1 if a
package (or the whole) is below its floor in .ci/coverage-floors.toml. The floors only
rise: set one to what is measured once it is higher.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from collections import defaultdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "test-artifacts" / ".coverage"
FLOORS = ROOT / ".ci" / "coverage-floors.toml"


def percent(covered: int, total: int) -> float:
    return 100.0 * covered / total if total else 100.0


def main() -> int:
    python = sys.executable
    if list(DATA.parent.glob(".coverage.*")):
        subprocess.run([python, "-m", "coverage", "combine", "--append", "-q"], cwd=ROOT,
                       check=True)  # fmt: skip
    report = DATA.parent / "coverage.json"
    subprocess.run([python, "-m", "coverage", "json", "-q", "-o", str(report)], cwd=ROOT,
                   check=True)  # fmt: skip
    files = json.loads(report.read_text())["files"]
    by_package: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    modules: list[tuple[float, str, int]] = []
    for name, data in files.items():
        s = data["summary"]
        covered = s["covered_lines"] + s.get("covered_branches", 0)
        total = s["num_statements"] + s.get("num_branches", 0)
        package = Path(name).parts[0]
        for key in (package, "all"):
            by_package[key][0] += covered
            by_package[key][1] += total
        modules.append((percent(covered, total), name, total))
    floors = tomllib.loads(FLOORS.read_text())["floors"]
    console = Console(width=100)
    table = Table(title="Branch coverage (lines and branches)", title_justify="left")
    for column in ("package", "covered", "of", "coverage", "floor", ""):
        table.add_column(column, justify="right" if column not in ("package", "") else "left")
    failed = []
    for package in [*sorted(p for p in by_package if p != "all"), "all"]:
        covered, total = by_package[package]
        got = percent(covered, total)
        floor = floors.get(package)
        low = floor is not None and got + 1e-9 < floor
        if low:
            failed.append(f"{package} {got:.1f}% < floor {floor}%")
        shown_floor = "" if floor is None else f"{floor}%"
        mark = "[red]BELOW[/red]" if low else ""
        table.add_row(package, str(covered), str(total), f"{got:.1f}%", shown_floor, mark)
    console.print(table)
    least = Table(title="Least-covered modules (10)", title_justify="left")
    for column in ("module", "coverage", "lines+branches"):
        least.add_column(column)
    for got, name, total in sorted(m for m in modules if m[2] >= 20)[:10]:
        least.add_row(name, f"{got:.1f}%", str(total))
    console.print(least)
    if failed:
        console.print("[red]coverage below its floor:[/red] " + "; ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
