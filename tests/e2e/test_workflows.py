"""Workflows in the running service, through the CLI: the README's TOML workflow (kb, chat,
a condition, a loop) run to its end, its status and events, the step metrics in the
analytics projection, and clear refusals of bad runs. And `chatllm config use`: a profile
switched while the service runs, recorded as an event."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import Service, cli, start_service, stop_service, wait_for

pytestmark = pytest.mark.e2e

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
TRIAGE = next(b for b in re.findall(r"```toml\n(.*?)```", README, re.S) if "[[steps]]" in b)


CONFIG = """
[log]
level = "INFO"

[profiles.strict.limits]
user = "2/minute"

[profiles.strict.http]
host = "0.0.0.0"
"""


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    workdir = tmp_path_factory.mktemp("workflows")
    folder = workdir / "workflows"
    folder.mkdir()
    (folder / "triage.toml").write_text(TRIAGE)
    service = start_service(
        workdir, config=CONFIG, extra_env={"CHATLLM_WORKFLOWS__FOLDER": str(folder)}
    )
    try:
        yield service
    finally:
        stop_service(service)


def test_the_readme_workflow_runs_from_the_cli_to_its_end(running: Service) -> None:
    # Step 1: the support context holds a document for the kb step to find.
    policy = b"Refunds are possible within 30 days.\n\nShipping takes 3 days."
    response = httpx.post(
        f"{running.base}/v1/contexts/support/documents",
        json={"name": "policy.txt", "content_base64": base64.b64encode(policy).decode()},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    wait_for(
        lambda: httpx.get(f"{running.base}/v1/contexts/support/events", timeout=30).json(),
        "the document in the archive (the kb step reads it there)",
    )

    # Step 2: `workflow run` starts the run and follows it to its end.
    done = cli(running, "workflow", "run", "triage", "-i", "question=Can I get a refund?")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "completed" in done.stdout
    run_id = re.search(r"run ([0-9a-f-]{36})", done.stdout).group(1)  # type: ignore[union-attr]

    # Step 3: the status shows every step settled; the condition held (a refund), so
    # escalate ran; the kb step found the refund paragraph; the loop ran 1-3 times.
    shown = cli(running, "workflow", "status", run_id, "--format", "json")
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)
    steps = {s["step"]: s for s in status["steps"]}
    assert status["status"] == "completed"
    assert status["steps"][0]["step"] == "docs"
    assert {k: v["status"] for k, v in steps.items()} == dict.fromkeys(
        ["docs", "answer", "escalate", "follow_up"], "completed"
    )
    assert steps["docs"]["output"][0]["passage"].startswith("Refunds are possible")
    assert steps["answer"]["output"]["reply"]
    assert 1 <= steps["follow_up"]["iterations"] <= 3

    # Step 4: the run's events, and the step metrics in the analytics projection.
    with_events = cli(running, "workflow", "status", run_id, "--events")
    assert "WorkflowFinished" in with_events.stdout

    def metrics() -> list[dict[str, object]]:
        listed = json.loads(cli(running, "workflow", "list", "--format", "json").stdout)
        [triage] = listed["workflows"]
        return triage["metrics"] if len(triage["metrics"]) == 4 else []

    found = wait_for(metrics, "step metrics in the analytics projection")
    assert {m["step"]: m["completed"] for m in found}["docs"] >= 1
    table = cli(running, "workflow", "list")
    assert "triage" in table.stdout and run_id[:8] in table.stdout


def test_a_question_without_refund_skips_the_escalation(running: Service) -> None:
    done = cli(running, "workflow", "run", "triage", "-i", "question=Where is my parcel?")
    assert done.returncode == 0, done.stdout + done.stderr
    run_id = re.search(r"run ([0-9a-f-]{36})", done.stdout).group(1)  # type: ignore[union-attr]
    status = httpx.get(f"{running.base}/v1/workflows/runs/{run_id}", timeout=30).json()
    escalate = next(s for s in status["steps"] if s["step"] == "escalate")
    assert escalate["status"] == "skipped" and "refund" in escalate["reason"]


def test_bad_runs_are_refused_with_the_reason(running: Service) -> None:
    unknown = cli(running, "workflow", "run", "nope")
    assert unknown.returncode == 1 and "no workflow named 'nope'" in unknown.stderr
    missing = httpx.post(f"{running.base}/v1/workflows/triage/runs", json={}, timeout=30)
    assert missing.status_code == 422 and "needs input 'question'" in missing.json()["detail"]
    wrong = httpx.post(
        f"{running.base}/v1/workflows/triage/runs",
        json={"inputs": {"question": 42}},
        timeout=30,
    )
    assert wrong.status_code == 422 and "must be str" in wrong.json()["detail"]


def test_config_use_switches_a_live_profile_and_records_who_and_what(running: Service) -> None:
    def ask() -> int:
        return httpx.post(
            f"{running.base}/v1/contexts/cfg-1/messages",
            json={"content": "hello", "user_id": "cfg-user"},
            timeout=30,
        ).status_code

    # Step 1: switch to the strict profile while the service runs.
    switched = cli(running, "config", "use", "strict")
    assert switched.returncode == 0, switched.stdout + switched.stderr
    assert "limits.user" in switched.stdout and "applied" in switched.stdout
    assert "http.host" in switched.stdout and "at next start" in switched.stdout

    # Step 2: the new user limit holds at once: 2 a minute.
    assert [ask(), ask(), ask()] == [200, 200, 429]

    # Step 3: back to no profile; the limit is the default again.
    back = cli(running, "config", "use", "", "--format", "json")
    change = json.loads(back.stdout)
    assert change["profile_before"] == "strict" and change["profile_after"] == ""
    assert ask() == 200

    # Step 4: an unknown profile is refused with the reason, and nothing changes.
    unknown = cli(running, "config", "use", "nope")
    assert unknown.returncode == 1 and "profile 'nope' is not defined" in unknown.stderr

    # Step 5: both switches are in the audit trail: who, before and after.
    def recorded() -> list[dict[str, object]]:
        found = cli(running, "audit", "search", "--action", "ConfigChanged", "--format", "jsonl")
        events = [json.loads(line) for line in found.stdout.splitlines() if line.strip()]
        return events if len(events) == 2 else []

    first, second = wait_for(recorded, "two ConfigChanged events in the archive")
    payload = first["payload"]
    assert (payload["profile_before"], payload["profile_after"]) == ("", "strict")
    assert {"key": "limits.user", "before": "600/hour;5000/day", "after": "2/minute"} in payload[
        "changes"
    ]
    assert payload["requested_by"] == first["user_id"] == "operator"
    assert second["payload"]["profile_after"] == ""


def test_the_runner_reads_the_log_only_once_a_workflow_is_defined(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """With no workflow, no runner consumes the log (each consumer of a long log costs the
    embedded broker); the first definition dropped into the folder starts it, and its
    runs go to their end."""
    workdir = tmp_path_factory.mktemp("workflows-later")
    folder = workdir / "workflows"
    folder.mkdir()
    service = start_service(workdir, extra_env={"CHATLLM_WORKFLOWS__FOLDER": str(folder)})
    try:
        health = httpx.get(f"{service.base}/healthz", timeout=30).json()
        idle = health["consumers"]["workflows"]
        assert idle["status"] == "ok" and "no workflow is defined" in idle["reason"], idle
        (folder / "triage.toml").write_text(TRIAGE)
        running = wait_for(
            lambda: (
                (w := httpx.get(f"{service.base}/healthz", timeout=30).json()["consumers"])[
                    "workflows"
                ]["reason"]
                == ""
                and w
            ),
            "the runner started by the first definition",
        )
        assert running["workflows"]["status"] in ("ok", "starting")
        done = cli(service, "workflow", "run", "triage", "-i", "question=Where is my parcel?")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "completed" in done.stdout
    finally:
        stop_service(service)
