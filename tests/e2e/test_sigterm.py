"""SIGTERM, as systemd, Kubernetes or `kill` send it to `chatllm up` alone (not to its
process group, as a terminal's Ctrl-C does): the same quiet stop as Ctrl-C."""

from __future__ import annotations

import signal
import time

import httpx
import pytest

from tests.e2e.conftest import start_service, stop_service
from tests.e2e.test_fresh_clone import alive, descendants

pytestmark = pytest.mark.e2e


def test_sigterm_to_chatllm_up_stops_everything_quietly(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    service = start_service(
        tmp_path_factory.mktemp("sigterm"), extra_env={"CHATLLM_HTTP__WORKERS": "2"}
    )
    try:
        reply = httpx.post(
            f"{service.base}/v1/chat/completions",
            json={"model": "auto", "messages": [{"role": "user", "content": "hello"}]},
            timeout=30,
        )
        assert reply.status_code == 200, reply.text
        started = descendants(service.proc.pid)
        service.proc.send_signal(signal.SIGTERM)
        try:
            code = service.proc.wait(30)
        except Exception:
            pytest.fail("SIGTERM did not stop `chatllm up` within 30 s")
        log = (service.workdir / "up.log").read_text()
        assert code == 0 and "chat-llm stopped" in log, log[-3000:]
        errors = [line for line in log.splitlines() if "ERROR" in line or "Traceback" in line]
        assert not errors, errors[:10]
        deadline = time.monotonic() + 15
        while alive(started) and time.monotonic() < deadline:
            time.sleep(0.3)
        assert not alive(started)
    finally:
        stop_service(service)
