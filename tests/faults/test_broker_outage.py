"""Fault: the broker stops while requests flow, then comes back.

Must hold: while it is down every turn fails fast with a clear 503 (no send hangs), and
when it is back the same service process answers again, and what it writes is archived,
without a restart.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from events import topics
from infra.adapters.kafka.broker import EmbeddedBroker
from infra.adapters.kafka.clients import ensure_topics
from tests.e2e.conftest import start_service, stop_service, wait_for

pytestmark = pytest.mark.e2e

DEADLINE_S = 15.0
"""The longest a turn may take while the log is down (delivery timeout 3 s, plus slack)."""


def ask(base: str, context: str) -> tuple[int, float, str]:
    started = time.monotonic()
    response = httpx.post(
        f"{base}/v1/contexts/{context}/messages", json={"content": "still there?"}, timeout=60
    )
    return response.status_code, time.monotonic() - started, response.text


def test_the_broker_goes_away_and_comes_back(tmp_path: Path) -> None:
    broker = EmbeddedBroker().start()
    port = broker.port
    service = start_service(
        tmp_path,
        extra_env={
            "CHATLLM_BROKER__BOOTSTRAP_SERVERS": broker.bootstrap_servers,
            "CHATLLM_BROKER__DELIVERY_TIMEOUT_MS": "3000",
            "CHATLLM_BROKER__REQUEST_TIMEOUT_MS": "2000",
        },
    )
    try:
        # Step 1: requests flow.
        assert [ask(service.base, f"flow-{i}")[0] for i in range(3)] == [200, 200, 200]

        # Step 2: the broker stops. Turns fail fast with a 503 that says why, in parallel too.
        broker.stop()
        with ThreadPoolExecutor(8) as pool:
            down = list(pool.map(lambda i: ask(service.base, f"down-{i}"), range(8)))
        for status, took, body in down:
            assert status == 503 and "event log unavailable" in body, body
            assert took < DEADLINE_S, f"a turn hung for {took:.1f} s"

        # Step 3: the broker is back (tansu keeps memory only: its topics are made again,
        # as an operator would). The same service process answers again, unrestarted.
        broker = EmbeddedBroker(port=port).start()
        names = [topics.EVENTS, topics.INGEST, topics.DEADLETTER]
        asyncio.run(ensure_topics(broker.bootstrap_servers, names, 4))
        wait_for(lambda: ask(service.base, "back-1")[0] == 200, "turns to succeed again", 90, 1)
        assert service.proc.poll() is None

        # Step 4: what it writes now reaches the archive again.
        wait_for(
            lambda: httpx.get(f"{service.base}/v1/contexts/back-1/events", timeout=30).json(),
            "the new turn in the archive",
            90,
        )
    finally:
        stop_service(service)
        broker.stop()
