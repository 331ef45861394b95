"""A chat turn through the gateway (one Ray actor call; two acked appends to the log; the demo
model) against the floor it stands on: an empty call to a Ray actor, measured the same way."""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from typing import Any

from benchmarks.common import Result, median_ms
from infra.broker import EmbeddedBroker
from infra.clock import new_trace_id
from infra.config import load_config
from infra.gateway import Gateway
from infra.kafka import ensure_topics
from infra.runtime import start_context_hosts, start_ray


class Echo:
    async def ping(self) -> int:
        return 1


async def _measure(gateway: Gateway, echo: Any, n: int) -> tuple[list[float], list[float]]:
    from actors.context import SendMessage

    turns, pings = [], []
    for i in range(n):
        command = SendMessage(
            context_id=f"bench-{i % 20}",
            tenant_id="bench",
            user_id="u",
            content=f"question {i}",
            trace_id=new_trace_id(),
            correlation_id=str(uuid.uuid4()),
        )
        started = time.perf_counter()
        await gateway.chat(command)
        turns.append(time.perf_counter() - started)
        started = time.perf_counter()
        await echo.ping.remote()
        pings.append(time.perf_counter() - started)
    return turns, pings


def run(n: int = 300) -> list[Result]:
    import ray

    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker() as broker:
        settings = load_config(
            env={},
            overrides={
                "broker.bootstrap_servers": broker.bootstrap_servers,
                "clickhouse.path": tmp,
            },
        ).settings
        asyncio.run(ensure_topics(broker.bootstrap_servers, [settings.topics.events], 4))
        start_ray(settings.ray)
        try:
            hosts = start_context_hosts(settings, broker.bootstrap_servers)
            echo = ray.remote(Echo).options(num_cpus=0).remote()  # type: ignore[attr-defined]
            gateway = Gateway(hosts)
            asyncio.run(_measure(gateway, echo, 40))  # warm up: contexts loaded, connections open
            turns, pings = asyncio.run(_measure(gateway, echo, n))
        finally:
            ray.shutdown()
    return [
        Result(
            "chat turn p50 (warm context)",
            "ms",
            median_ms(turns),
            "empty Ray actor call p50",
            median_ms(pings),
            higher_is_better=False,
            note="ratio = floor / turn; a turn also waits for 2 broker acks",
        )
    ]
