"""Several API processes in one `chatllm up` (http.workers): one port, the same shards and
store host behind every process."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.conftest import Service, start_service, stop_service, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    running = start_service(
        tmp_path_factory.mktemp("apis"), extra_env={"CHATLLM_HTTP__WORKERS": "2"}
    )
    try:
        # start_service waits for the first process; the second joins the port a moment
        # later (later still on a loaded machine). Every response names its process: wait
        # until both answer, and one counter-publishing interval more.
        import time

        seen: set[int] = set()
        deadline = time.monotonic() + 60
        while seen != {0, 1} and time.monotonic() < deadline:
            with httpx.Client() as fresh:
                seen.add(int(fresh.get(f"{running.base}/healthz").headers["x-chatllm-api-process"]))
            time.sleep(0.05)
        assert seen == {0, 1}, f"only API processes {seen} answered within 60 s"
        time.sleep(1.5)
        yield running
    finally:
        stop_service(running)


def test_two_api_processes_serve_one_context_alternately_and_its_history_stays_exact(
    service: Service,
) -> None:
    """`chatllm up` runs two API processes on one port; each new connection may land
    on either. One context's turns through both: one writer (its shard), gapless versions,
    and each reply knows every turn before it."""
    served: dict[int, int] = {}
    turns = 0
    while min(served.get(0, 0), served.get(1, 0)) < 3 and turns < 60:
        turns += 1
        with httpx.Client() as fresh:  # a new connection each time
            reply = fresh.post(
                f"{service.base}/v1/chat/completions",
                json={"model": "auto", "messages": [{"role": "user", "content": f"q{turns}"}]},
                headers={"X-Context-Id": "two-apis", "X-Tenant-Id": "multi"},
            )
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert f"(turn {turns})" in body["choices"][0]["message"]["content"]
        process = body["chatllm"]["api_process"]
        served[process] = served.get(process, 0) + 1
    assert served.get(0, 0) >= 3 and served.get(1, 0) >= 3, served
    logged = httpx.get(
        f"{service.base}/v1/contexts/two-apis/events", headers={"X-Tenant-Id": "multi"}
    ).json()
    assert [e["stream_version"] for e in logged] == list(range(1, len(logged) + 1))
    assert [e["type"] for e in logged].count("MessageReceived") == turns


def _turns_total(text: str) -> float:
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith("chatllm_turns_total{")
    )


def test_metrics_show_the_turns_of_every_api_process_summed(service: Service) -> None:
    """A scrape lands on one process of the port; whichever it is, chatllm_turns_total
    counts the turns both served (the other's as of its last write, within a second)."""
    import time

    before: dict[int, float] = {}
    served: dict[int, int] = {}
    while len(before) < 2:  # each process's view of the total, before
        with httpx.Client() as fresh:
            reply = fresh.get(f"{service.base}/metrics")
            reply.raise_for_status()
            before.setdefault(int(reply.headers["x-chatllm-api-process"]), _turns_total(reply.text))
    start = max(before.values())
    while min(served.get(0, 0), served.get(1, 0)) < 3:
        with httpx.Client() as fresh:
            reply = fresh.post(
                f"{service.base}/v1/chat/completions",
                json={"model": "auto", "messages": [{"role": "user", "content": "count me"}]},
                headers={"X-Tenant-Id": "counted"},
            )
        assert reply.status_code == 200, reply.text
        process = reply.json()["chatllm"]["api_process"]
        served[process] = served.get(process, 0) + 1
    expected = start + sum(served.values())
    seen: dict[int, float] = {}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (len(seen) < 2 or set(seen.values()) != {expected}):
        with httpx.Client() as fresh:
            reply = fresh.get(f"{service.base}/metrics")
        seen[int(reply.headers["x-chatllm-api-process"])] = _turns_total(reply.text)
        time.sleep(0.2)
    assert seen == {0: expected, 1: expected}, (seen, served, before)


def test_health_says_when_the_store_host_is_gone(service: Service) -> None:
    # Runs last in this module: it kills the store host.
    import os
    import signal
    from pathlib import Path

    from tests.e2e.test_fresh_clone import descendants

    (host,) = [
        pid
        for pid in descendants(service.proc.pid)
        if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::StoreHost")
    ]
    assert httpx.get(f"{service.base}/healthz").json()["status"] == "ok"
    os.kill(host, signal.SIGKILL)
    health = wait_for(
        lambda: (
            (h := httpx.get(f"{service.base}/healthz")).status_code == 200
            and h.json()["status"] == "degraded"
            and h.json()
        ),
        "health to name the store host",
    )
    assert health["stuck"] == ["store"]
    assert "does not answer" in health["consumers"]["store"]["reason"]
