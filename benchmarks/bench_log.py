"""Appending to the log: KafkaEventSink (encode, key, acks=all, wait for every ack) against
raw aiokafka sends of pre-encoded bytes with the same producer settings, on the embedded broker."""

from __future__ import annotations

import asyncio
import time

from aiokafka import AIOKafkaProducer

from benchmarks.common import Result
from events import encode
from infra.adapters.kafka.broker import EmbeddedBroker
from infra.adapters.kafka.clients import KafkaEventSink, ensure_topics
from infra.config import BrokerConfig
from tests.factories import make_event


async def _measure(bootstrap: str, n: int, batch: int) -> tuple[float, float]:
    await ensure_topics(bootstrap, ["bench-sink", "bench-raw"], partitions=4)
    events = [make_event(f"ctx-{i % 200}", i // 200 + 1, n=i + 1) for i in range(n)]

    sink = KafkaEventSink(bootstrap, "bench-sink", BrokerConfig())
    await sink.start()
    started = time.perf_counter()
    for i in range(0, n, batch):
        await sink.append(events[i : i + batch])
    ours = n / (time.perf_counter() - started)
    await sink.stop()

    wire = [(e.stream_id.encode(), encode(e)) for e in events]
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=BrokerConfig().linger_ms
    )
    await producer.start()
    started = time.perf_counter()
    for i in range(0, n, batch):
        pending = [await producer.send("bench-raw", key=k, value=v) for k, v in wire[i : i + batch]]
        await asyncio.gather(*pending)
    raw = n / (time.perf_counter() - started)
    await producer.stop()
    return ours, raw


def run(n: int = 20_000, batch: int = 100) -> list[Result]:
    with EmbeddedBroker() as broker:
        ours, raw = asyncio.run(_measure(broker.bootstrap_servers, n, batch))
    return [
        Result(
            f"append to log ({batch}/batch, acks=all)",
            "events/s",
            ours,
            "raw aiokafka, pre-encoded",
            raw,
        )
    ]
