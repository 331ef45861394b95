"""The server suite (tests/servers): where no container engine answers it is skipped with
one line that names what is missing, and exits 0; never a silent pass. A workflow with a
mistake does not pass the offline schema check."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import engine

ROOT = Path(__file__).resolve().parents[2]


def test_without_an_engine_the_reason_names_each_place_looked() -> None:
    address, why = engine.find_engine(
        env={"XDG_RUNTIME_DIR": "/run/user/1000"},
        exists=lambda _: False,
        which=lambda _: None,
        ping=lambda _: True,
    )
    assert address is None
    assert why.startswith("no container engine (docker or podman)")
    assert "DOCKER_HOST is unset" in why
    assert "/var/run/docker.sock" in why and "/run/user/1000/podman/podman.sock" in why
    assert "no docker or podman command on PATH" in why


def test_an_engine_that_does_not_answer_is_named_as_such() -> None:
    address, why = engine.find_engine(
        env={"DOCKER_HOST": "tcp://10.0.0.9:2375"},
        exists=lambda path: path == "/var/run/docker.sock",
        which=lambda name: f"/usr/bin/{name}" if name == "docker" else None,
        ping=lambda _: False,
    )
    assert address is None
    assert "DOCKER_HOST=tcp://10.0.0.9:2375 does not answer" in why
    assert "docker found but no engine answers" in why


def test_an_answering_engine_is_used() -> None:
    address, why = engine.find_engine(
        env={},
        exists=lambda path: path == "/var/run/docker.sock",
        which=lambda _: None,
        ping=lambda address: address == "unix:///var/run/docker.sock",
    )
    assert (address, why) == ("unix:///var/run/docker.sock", "")


def test_the_runner_skips_with_one_line_and_exit_0(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    runner = importlib.import_module("tests.servers.__main__")
    monkeypatch.setattr(runner, "find_engine", lambda: (None, "no container engine (docker)"))
    assert runner.main() == 0
    assert capsys.readouterr().out == "skipped: no container engine (docker)\n"


def test_a_broken_workflow_fails_the_schema_check(tmp_path: Path) -> None:
    checker = ROOT / ".ci" / "check_workflows.py"
    fine = subprocess.run([sys.executable, str(checker)], capture_output=True, text=True)
    assert fine.returncode == 0, fine.stderr
    copy = tmp_path / "repo"
    (copy / ".ci" / "schemas").mkdir(parents=True)
    (copy / ".github" / "workflows").mkdir(parents=True)
    shutil.copy(checker, copy / ".ci" / "check_workflows.py")
    shutil.copy(ROOT / ".ci/schemas/github-workflow.json", copy / ".ci/schemas")
    text = (ROOT / ".github/workflows/servers.yml").read_text()
    (copy / ".github/workflows/servers.yml").write_text(text.replace("runs-on:", "runs_on:"))
    broken = subprocess.run(
        [sys.executable, str(copy / ".ci" / "check_workflows.py")], capture_output=True, text=True
    )
    assert broken.returncode == 1 and "jobs/servers" in broken.stderr
