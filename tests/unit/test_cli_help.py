"""Every command's --help reads as written: rich takes words in square brackets for markup
and drops them ("--policy TOML: , , []"), so a help text must escape them. Renders each
command's help and fails on what is left when markup ate the words."""

from __future__ import annotations

import re
from typing import Any

import typer
from typer.testing import CliRunner

from infra.cli.main import app

EATEN = re.compile(r"\[\]|, ,|: ,|\(\s*,|,\s*\)")
"""What remains of a help text whose bracketed words rich took for markup."""


def _commands(group: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [path]
    for name, command in group.commands.items():
        if hasattr(command, "commands"):  # a group (Typer's own click)
            found += _commands(command, (*path, name))
        else:
            found.append((*path, name))
    return found


def test_no_help_text_loses_its_bracketed_words() -> None:
    root = typer.main.get_command(app)
    runner = CliRunner()
    checked = 0
    for path in _commands(root):
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, (path, result.output)
        eaten = [line.strip() for line in result.output.splitlines() if EATEN.search(line)]
        assert eaten == [], f"chatllm {' '.join(path)} --help: {eaten}"
        checked += 1
    assert checked > 30  # every command and group was rendered


def _leaf(root: Any, path: tuple[str, ...]) -> Any:
    command = root
    for name in path:
        command = command.commands[name]
    return command


def test_every_time_range_has_one_pair_of_names() -> None:
    """--since/--until on every command that takes a time range, --from/--to accepted as
    the same (docs used both; issue 23, item 1)."""
    root = typer.main.get_command(app)
    ranged = 0
    for path in _commands(root):
        for param in getattr(_leaf(root, path), "params", []):
            if param.name in ("since", "until"):
                names = set(param.opts)
                want = {"--since", "--from"} if param.name == "since" else {"--until", "--to"}
                assert names == want, f"chatllm {' '.join(path)}: {sorted(names)}"
                ranged += 1
    assert ranged >= 10
