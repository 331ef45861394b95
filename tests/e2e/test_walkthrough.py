"""The docs' walk-through: every fenced shell block of README.md and docs/*.md, run in order,
line by line, by a shell, against a stack this test starts, as a new user would type them.

A block that cannot run here says so, with the reason: its first line is
`# not runnable here: REASON`, or an HTML comment right before it reads
`<!-- walkthrough: not runnable here: REASON -->`. The files the docs show with their
path on their first line (`# workflows/triage.toml`, `# plugins/shout.py`,
`# policy.toml: ...`) are written where they say first, as a user would save them.
The few placeholders the docs use for what only a run knows (a dead letter's id, a run's
id, a key's id) are replaced by the real ones.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import Service, start_service, stop_service, wait_for

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = re.compile(
    r"(?:<!-- (?P<mark>walkthrough: [^>]*?) -->\s*\n)?"
    r"```(?:sh|bash|shell|console)\n(?P<body>.*?)```",
    re.S,
)
FILE = re.compile(
    r"```(?:toml|python|yaml)\n# (?P<path>[\w./-]+\.(?:toml|py|yaml))[:\s](?P<rest>.*?)```", re.S
)
SKIP = "not runnable here:"
UUID = re.compile(r"\b([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\b")

# Commands whose documented outcome is an exit code other than 0.
EXPECTED_EXIT = {"chatllm dlq retry": 1}  # the README: a bad event is rejected again


@dataclass
class Block:
    doc: str
    line: int
    commands: list[str]
    skipped: str


def blocks() -> list[Block]:
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for m in SHELL.finditer(text):
            body = m.group("body")
            first = body.splitlines()[0] if body.strip() else ""
            mark = m.group("mark") or ""
            skipped = ""
            if first.startswith(f"# {SKIP}"):
                skipped = first.split(SKIP, 1)[1].strip()
            elif SKIP in mark:
                skipped = mark.split(SKIP, 1)[1].strip()
            # Lines joined where they continue (a trailing backslash).
            joined = body.replace("\\\n", " ")
            commands = [c for c in joined.splitlines() if c.strip() and not c.startswith("#")]
            line = text[: m.start("body")].count("\n") + 1
            found.append(Block(doc.relative_to(ROOT).as_posix(), line, commands, skipped))
    return found


def test_every_shell_block_runs_here_or_says_why_not() -> None:
    """No block is left out silently: each one is run below, or marked with its reason."""
    found = blocks()
    for block in found:
        if block.skipped:
            assert len(block.skipped) > 20, f"{block.doc}:{block.line}: say why it cannot run"
        else:
            assert block.commands, f"{block.doc}:{block.line}: an empty block"
    assert len([b for b in found if not b.skipped]) >= 7
    assert len([b for b in found if b.skipped]) == 3  # make run/test, Kafka ACLs, kubectl


def write_doc_files(into: Path) -> list[str]:
    written = []
    for doc in DOCS:
        for m in FILE.finditer(doc.read_text()):
            path = into / m.group("path")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(m.group(0).split("\n", 1)[1].rsplit("```", 1)[0])
            written.append(m.group("path"))
    return written


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    workdir = tmp_path_factory.mktemp("walkthrough")
    written = write_doc_files(workdir)
    assert {"workflows/triage.toml", "plugins/shout.py", "policy.toml"} <= set(written)
    (workdir / ".venv").symlink_to(Path(sys.executable).parents[1])
    running = start_service(
        workdir,
        extra_env={"CHATLLM_PLUGINS__FOLDER": "plugins", "CHATLLM_WORKFLOWS__FOLDER": "workflows"},
    )
    try:
        yield running
    finally:
        stop_service(running)


def _dead_letter(stack: Service) -> str:
    """A dead letter to show and retry: an upstream event of a type no one knows."""
    bad = {"event_id": "019abf2e-8a1c-7c3e-9d2a-4f1e2b3c4d5e", "type": "PizzaOrdered",
           "schema": 1, "occurred_at": "2026-11-25T06:50:31Z", "stream_id": "ext:walk-1",
           "stream_version": 1, "tenant_id": "default", "user_id": "u",
           "trace_id": "0af7651916cd43dd8448eb211c80319c", "span_id": "b7ad6b7169203331",
           "correlation_id": "c", "payload": {}}  # fmt: skip
    httpx.post(f"{stack.base}/v1/events", json=[bad], timeout=30)
    letters = wait_for(
        lambda: httpx.get(f"{stack.base}/v1/deadletters", timeout=30).json(), "a dead letter"
    )
    return f"{letters[-1]['partition']}/{letters[-1]['offset']}"


def test_the_docs_shell_blocks_run_in_order_against_a_running_stack(stack: Service) -> None:
    env = {
        **stack.env,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),
        "COLUMNS": "200",
    }
    known: dict[str, str] = {
        "0/12": _dead_letter(stack),
        "--context ID": "--context trip-1",
        "--at 2026-11-25T10:00:00Z": "--at NOW",  # the moment the command runs
        "--user U": "--user anonymous",
    }
    ran, failures = 0, []
    for block in blocks():
        if block.skipped:
            continue
        for command in block.commands:
            for placeholder, value in known.items():
                command = command.replace(placeholder, value)
            command = command.replace("--at NOW", f"--at {datetime.now(UTC).isoformat()}")
            done = subprocess.run(
                ["bash", "-c", command], cwd=stack.workdir, env=env, input="y\n",
                capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            ran += 1
            expected = next((c for p, c in EXPECTED_EXIT.items() if command.startswith(p)), 0)
            if done.returncode != expected:
                why = (done.stderr or done.stdout)[-600:]
                failures.append(f"{block.doc}:{block.line}: `{command}` exited "
                                f"{done.returncode}: {why}")  # fmt: skip
            output = done.stdout + done.stderr
            run = UUID.search(output)
            if run and command.startswith("chatllm workflow run"):
                known["<run_id>"] = run.group(1)
            key = re.search(r"\b(key-[0-9a-f]{12})\b", output)
            if key and command.startswith("chatllm key create"):
                known["key-1a2b3c4d5e6f"] = key.group(1)
    assert ran >= 20
    assert failures == [], "\n".join(failures)
