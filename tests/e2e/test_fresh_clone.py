"""A newcomer's first minutes, as the README tells them: a fresh clone, `make run` (which runs
`chatllm up` from the clone, on the embedded default, with no config file and no .chatllm/),
the README's own shell commands and its first Python example word for word, then Ctrl-C as a
terminal sends it: SIGINT to the whole foreground process group."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.adapters.kafka.broker import free_port
from tests.e2e.conftest import wait_until_up

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def fresh_clone(into: Path) -> Path:
    """What `git clone` gives a newcomer: the files git tracks (and, while developing, the
    new ones it would track), nothing it ignores (.venv, .chatllm, caches)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    clone = into / "chat-llm"
    for name in filter(None, listed):
        source = ROOT / name.decode()
        if source.is_file():
            target = clone / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    assert not (clone / ".chatllm").exists()
    return clone


def descendants(pid: int) -> set[int]:
    """Every process below `pid` now (Ray's workers leave its process group, not its tree)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    left = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":  # a zombie has exited; only its parent's wait is missing
            left.add(pid)
    return left


@pytest.fixture(scope="module")
def newcomer(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Path, int, subprocess.Popen[bytes]]]:
    clone = fresh_clone(tmp_path_factory.mktemp("fresh"))
    (clone / ".venv").symlink_to(Path(sys.executable).parents[1])  # the venv may be reused
    port = free_port()
    # `make run` is `.venv/bin/chatllm up` in the clone, on the clone's code.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATLLM_")}
    env |= {"PYTHONPATH": str(clone), "PYTHONUNBUFFERED": "1", "CHATLLM_HTTP__PORT": str(port)}
    log = open(clone / "up.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [".venv/bin/chatllm", "up"],
        cwd=clone,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # the terminal's foreground process group, of its own
    )
    log.close()
    wait_until_up(proc, f"http://127.0.0.1:{port}/v1/models", clone / "up.log")
    try:
        yield clone, port, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_the_readme_shell_commands_run_against_a_fresh_clone(
    newcomer: tuple[Path, int, subprocess.Popen[bytes]],
) -> None:
    clone, port, _ = newcomer
    using = README.split("## Using it", 1)[1]
    block = re.search(r"```sh\n(.*?)```", using, flags=re.S)
    assert block is not None
    commands = [line for line in block.group(1).splitlines() if line.strip()]
    assert len(commands) >= 4
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATLLM_")}
    env |= {"PYTHONPATH": str(clone), "CHATLLM_HTTP__PORT": str(port)}
    outputs = []
    for line in commands:  # each line as written, by a shell, in the clone
        done = subprocess.run(
            ["bash", "-c", line],
            cwd=clone,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, f"{line}: {done.stderr}"
        outputs.append(done.stdout)
    # The second message continued the first one's conversation, as the README says, and
    # the audit trail holds both turns, gapless, one event per line.
    assert "turn 2" in outputs[1], outputs[1]
    logged = [json.loads(line) for line in outputs[-1].splitlines()]
    assert [e["stream_version"] for e in logged] == list(range(1, len(logged) + 1))
    assert [e["type"] for e in logged].count("MessageReceived") == 2
    # "exactly as logged": byte for byte what the log holds (the request log's jsonl).
    import httpx

    as_logged = httpx.get(
        f"http://127.0.0.1:{port}/v1/events", params={"context": "trip-1", "format": "jsonl"}
    ).text.splitlines()
    assert sorted(outputs[-1].splitlines()) == sorted(as_logged)
    # Tracing is off by default, and still every event of a turn carries the turn's span.
    spans: dict[str, set[str]] = {}
    for e in logged:
        spans.setdefault(e["correlation_id"], set()).add(e["span_id"])
    assert len(spans) == 2 and all(len(s) == 1 for s in spans.values()), spans


def test_the_readme_first_python_example_runs_as_written(
    newcomer: tuple[Path, int, subprocess.Popen[bytes]],
) -> None:
    _, port, _ = newcomer
    example = re.search(r"```python\n(from openai import OpenAI.*?)```", README, flags=re.S)
    assert example is not None
    code = example.group(1)
    assert 'api_key="sk-..."' in code  # any key, while auth.required is off (the default)
    code = code.replace("http://127.0.0.1:8000", f"http://127.0.0.1:{port}")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip(), "the streamed reply printed nothing"


def test_ctrl_c_stops_everything_quickly_and_quietly(
    newcomer: tuple[Path, int, subprocess.Popen[bytes]],
) -> None:
    # Runs last in this module: it stops the service.
    clone, _, proc = newcomer
    started = descendants(proc.pid)
    assert len(started) >= 3, "the broker, Ray and its workers should be running"
    began = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal does on Ctrl-C
    try:
        code = proc.wait(20)
    except subprocess.TimeoutExpired:
        pytest.fail("Ctrl-C did not stop `chatllm up` within 20 s")
    took = time.monotonic() - began
    log = (clone / "up.log").read_text()
    assert code == 0 and "chat-llm stopped" in log, log[-2000:]
    # Nothing it started is left running (Ray's workers sit in process groups of their own).
    deadline = time.monotonic() + 15
    while alive(started) and time.monotonic() < deadline:
        time.sleep(0.3)
    left = alive(started)
    assert not left, [Path(f"/proc/{p}/cmdline").read_bytes()[:120] for p in left]
    errors = [line for line in log.splitlines() if " ERROR " in line or "Traceback" in line]
    assert not errors, errors[:10]
    assert took < 15, f"stopping took {took:.1f} s"
