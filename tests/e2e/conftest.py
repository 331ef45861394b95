"""`chatllm up` as a user runs it, in its own process, for the e2e tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from infra.adapters.kafka.broker import free_port

CHATLLM = [sys.executable, "-m", "infra.cli"]


@dataclass
class Service:
    base: str
    env: dict[str, str]
    proc: subprocess.Popen[bytes]
    workdir: Path

    def log(self) -> str:
        return (self.workdir / "up.log").read_text()


def start_service(
    workdir: Path, config: str = "", extra_env: dict[str, str] | None = None
) -> Service:
    port = free_port()
    (workdir / "chatllm.toml").write_text(config.replace("{port}", str(port)))
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "CHATLLM_HTTP__PORT": str(port),
        "CHATLLM_CLICKHOUSE__PATH": str(workdir / "chdb"),
        "CHATLLM_STREAMS__DATADIR": str(workdir),
        "CHATLLM_RAY__NAMESPACE": f"chatllm-e2e-{port}",
        # One API process unless a test asks for more (the default: one per two cores): the
        # suite starts many stacks on two cores. test_api_processes and test_sigterm run
        # two.
        "CHATLLM_HTTP__WORKERS": "1",
        **_server_env(port),
        **(extra_env or {}),
    }
    log = open(workdir / "up.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [*CHATLLM, "up"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=workdir,
        start_new_session=True,
    )
    log.close()
    base = f"http://127.0.0.1:{port}"
    wait_until_up(proc, f"{base}/healthz", workdir / "up.log")
    return Service(base=base, env=env, proc=proc, workdir=workdir)


def _server_env(port: int) -> dict[str, str]:
    """Under the server suite (tests/servers): the stack on Apache Kafka and a ClickHouse
    server, with topics and a database of its own."""
    bootstrap = os.environ.get("CHATLLM_TEST_BOOTSTRAP")
    url = os.environ.get("CHATLLM_TEST_CLICKHOUSE_URL")
    if not bootstrap or not url:
        return {}
    return {
        "CHATLLM_BROKER__BOOTSTRAP_SERVERS": bootstrap,
        "CHATLLM_BROKER__ENABLE_IDEMPOTENCE": "true",
        "CHATLLM_CLICKHOUSE__URL": url,
        "CHATLLM_CLICKHOUSE__DATABASE": f"e2e_{port}",
        **{
            f"CHATLLM_TOPICS__{name.upper()}": f"{name}-{port}"
            for name in ("events", "ingest", "deadletter", "observations")
        },
    }


def wait_until_up(
    proc: subprocess.Popen[bytes], url: str, log: Path, timeout_s: float = 120
) -> None:
    """Wait until `url` answers 200; if the process ends or time runs out, kill its process
    group and fail with the end of its log."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"chatllm up did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def wait_for(
    check: Callable[[], Any], what: str, timeout_s: float = 30, every_s: float = 0.3
) -> Any:
    """Poll `check` until it returns something truthy (returned), or fail naming `what`."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every_s)


def stop_service(service: Service) -> None:
    if service.proc.poll() is None:
        service.proc.send_signal(signal.SIGINT)
        try:
            service.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(service.proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The embedded default, no config file."""
    running = start_service(tmp_path_factory.mktemp("up"))
    try:
        yield running
    finally:
        stop_service(running)


def cli(service: Service, *args: str, url: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CHATLLM, *args, *(["--url", service.base] if url else [])],
        env=service.env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=service.workdir,
    )
