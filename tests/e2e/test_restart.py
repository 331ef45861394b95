"""A restart loses nothing: turns in several contexts and tenants, a spent limit and learned
routing, then `chatllm up` stops (Ctrl-C, or SIGKILL) and a new one starts on the same data
directory. The embedded broker kept its log in memory; the archive brings it back."""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Service, cli, start_service, stop_service

pytestmark = pytest.mark.e2e

CONFIG = """
[limits]
user = "6/hour"
rate_per_s = 0

[routing.learning]
enabled = true
max_explore = 0.0

[[routing.bands]]
name = "simple"
max_complexity = 0.25
model = "demo-fast"
candidates = ["demo-fast", "demo-1"]

[[routing.bands]]
name = "standard"
max_complexity = 1.0
model = "demo-large"
"""


def say(
    service: Service, context: str, text: str, tenant: str, user: str = "alice"
) -> httpx.Response:
    return httpx.post(
        f"{service.base}/v1/contexts/{context}/messages",
        json={"content": text, "user_id": user},
        headers={"X-Tenant-Id": tenant},
        timeout=60,
    )


def events_of(service: Service, context: str, tenant: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = httpx.get(
        f"{service.base}/v1/contexts/{context}/events", headers={"X-Tenant-Id": tenant}
    ).json()
    return found


def kill(service: Service) -> None:
    """SIGKILL: no shutdown at all (the broker child and the anomaly processors die with it;
    Ray's own processes are in the same group, as under a terminal or a supervisor that
    kills the group)."""
    status = service.workdir / "processors" / "status"
    deadline = time.monotonic() + 60
    while not (processors := [int(p.stem) for p in status.glob("*.json")]):
        assert time.monotonic() < deadline, "the processors' worker never reported"
        time.sleep(0.2)
    os.killpg(service.proc.pid, signal.SIGKILL)
    service.proc.wait(30)
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in processors):
        assert time.monotonic() < deadline, "the processors' worker outlived chatllm up"
        time.sleep(0.2)


@pytest.mark.parametrize("stop", ["sigint", "sigkill"])
def test_a_restart_loses_nothing(tmp_path: Path, stop: str) -> None:
    first = start_service(tmp_path, CONFIG)
    try:
        # Two tenants, three contexts, a user who spends the limit, routing that learns.
        assert say(first, "trip-1", "How do I plan a trip to Lisbon?", "alpha").status_code == 200
        between = datetime.now(UTC)
        time.sleep(0.05)
        assert say(first, "trip-1", "And what should I eat there?", "alpha").status_code == 200
        assert say(first, "ctx-b", "Hello from beta", "beta").status_code == 200
        # Bob's words are erased before the restart; his context must go on after it.
        assert say(first, "ctx-bob", "bob's pin is 4321", "beta", user="bob").status_code == 200
        forgot = cli(first, "forget", "--user", "bob", "--yes", "--tenant", "beta")
        assert forgot.returncode == 0, forgot.stderr
        for i in range(6):
            assert say(first, f"spend-{i}", "hi", "alpha", user="spender").status_code == 200
        assert say(first, "spend-x", "hi", "alpha", user="spender").status_code == 429
        replies = [say(first, f"learn-{i}", "hi", "gamma", user=f"g{i}").json() for i in range(3)]
        assert {r["model"] for r in replies} == {"demo-fast"}  # the band's model, so far
        for i, reply in enumerate(replies):  # and users dislike its answers
            fed = httpx.post(
                f"{first.base}/v1/contexts/learn-{i}/feedback",
                json={"message_id": reply["message_id"], "thumbs": "down"},
                headers={"X-Tenant-Id": "gamma"},
            )
            assert fed.status_code == 200, fed.text
        learned = say(first, "learn-after", "hi", "gamma", user="g9").json()
        assert learned["model"] == "demo-1"
        before = {c: events_of(first, c, t) for c, t in [("trip-1", "alpha"), ("ctx-b", "beta")]}
        assert [e["stream_version"] for e in before["trip-1"]] == list(
            range(1, len(before["trip-1"]) + 1)
        )
        # Everything acknowledged is archived (the audit waits for it): the SIGKILL below
        # comes after that, not inside the projection's lag.
        assert cli(first, "audit", "verify", "--tenant", "alpha").returncode == 0
    finally:
        if stop == "sigint":
            stop_service(first)
        else:
            kill(first)

    second = start_service(tmp_path, CONFIG)
    try:
        # The next turn continues the context at the next version, with its history.
        third = say(second, "trip-1", "Which museums?", "alpha")
        assert third.status_code == 200, third.text
        assert "turn 3" in third.json()["reply"], third.json()["reply"]
        after = events_of(second, "trip-1", "alpha")
        assert after[: len(before["trip-1"])] == before["trip-1"]
        assert [e["stream_version"] for e in after] == list(range(1, len(after) + 1))
        assert [e["type"] for e in after].count("ContextCreated") == 1
        assert say(second, "ctx-b", "Still here?", "beta").json()["ok"] is True
        # The erased context continues its chain (its erased events keep their digests),
        # and what was erased stays erased.
        assert say(second, "ctx-bob", "new words", "beta", user="bob").status_code == 200
        transcript = httpx.get(
            f"{second.base}/v1/contexts/ctx-bob/transcript", headers={"X-Tenant-Id": "beta"}
        ).text
        assert "new words" in transcript and "4321" not in transcript
        # The audit chain holds across the restart, for every tenant.
        for tenant in ("alpha", "beta", "gamma"):
            verified = cli(second, "audit", "verify", "--tenant", tenant, "--format", "json")
            assert verified.returncode == 0, verified.stdout
            assert json.loads(verified.stdout)["ok"] is True
        # Time travel answers before and after the restart.
        for at in (between, datetime.now(UTC)):
            state = httpx.get(
                f"{second.base}/v1/contexts/trip-1/state",
                params={"at": at.isoformat()},
                headers={"X-Tenant-Id": "alpha"},
            )
            assert state.status_code == 200, state.text
        # Ownership is durable: another tenant gets 403, the owner still gets in.
        intruder = say(second, "trip-1", "mine now", "intruder")
        assert intruder.status_code == 403, intruder.text
        assert "another tenant" in intruder.json()["error"]["message"]
        assert say(second, "ctx-b", "and me", "beta").status_code == 200
        # The spent limit is still spent; the learned preference still holds.
        assert say(second, "spend-y", "hi", "alpha", user="spender").status_code == 429
        assert say(second, "learn-later", "hi", "gamma", user="g10").json()["model"] == "demo-1"
    finally:
        stop_service(second)


def test_a_rebuild_from_the_broker_after_a_restart_keeps_every_row(tmp_path: Path) -> None:
    first = start_service(tmp_path, CONFIG)
    try:
        for i in range(3):
            assert say(first, f"rb-{i}", f"question {i}", "rb").status_code == 200
        assert cli(first, "audit", "verify", "--tenant", "rb").returncode == 0
    finally:
        stop_service(first)
    second = start_service(tmp_path, CONFIG)
    try:
        assert say(second, "rb-9", "one more", "rb").status_code == 200
        memory = lambda: httpx.get(  # noqa: E731
            f"{second.base}/v1/memory", headers={"X-Tenant-Id": "rb"}
        ).json()
        deadline = time.monotonic() + 30
        while len(memory()) < 4 and time.monotonic() < deadline:
            time.sleep(0.3)
        assert len(memory()) == 4
        rebuilt = cli(second, "replay", "rebuild", "--all", "--source", "broker")
        assert rebuilt.returncode == 0, rebuilt.stderr
        assert len(memory()) == 4  # the rows from before the restart are still there
    finally:
        stop_service(second)
