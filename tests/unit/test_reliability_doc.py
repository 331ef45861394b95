"""docs/reliability.md stays current: every test it names exists, and every fault test is
named in it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "reliability.md").read_text()


def _tests_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name.startswith("test_")
    }


def test_every_named_test_exists_and_every_fault_test_is_named() -> None:
    named = set(re.findall(r"`(tests/[\w/]+\.py)::(test_\w+)`", DOC))
    assert named, "the table names no test"
    for path, name in sorted(named):
        assert name in _tests_in(ROOT / path), f"{path}::{name} is named but does not exist"
    for path in sorted((ROOT / "tests" / "faults").glob("test_*.py")):
        relative = str(path.relative_to(ROOT))
        for name in _tests_in(path):
            assert (relative, name) in named, f"{relative}::{name} is not in docs/reliability.md"
