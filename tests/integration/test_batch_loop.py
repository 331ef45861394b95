"""The batch loop against the real broker: the next batch is gathered, and shown to the
`early` hook, while the one before it is still being handled; handling stays one batch at
a time, in order, and every record is handled once."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from infra.adapters.kafka.broker import EmbeddedBroker
from streams.loop import BatchLoop, LoopSettings
from tests.conftest import Topics

pytestmark = pytest.mark.integration


async def _produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value=value, partition=0)
    finally:
        await producer.stop()


async def test_the_next_batch_reaches_early_while_the_one_before_is_handled(
    broker: EmbeddedBroker, topics: Topics
) -> None:
    bootstrap = broker.bootstrap_servers
    settings = LoopSettings(
        bootstrap_servers=bootstrap,
        topic=topics.events,
        group=f"loop-{uuid.uuid4().hex[:8]}",
        batch_size=10,
        batch_within_s=0.05,
        fetch_wait_s=0.1,
        fetch_min_bytes=1,
    )
    seen_early: list[list[bytes]] = []
    handled: list[list[bytes]] = []
    release = asyncio.Event()
    in_handle = 0
    most_in_handle = 0

    async def early(records: Any) -> None:
        seen_early.append([r.value for r in records])

    async def handle(records: Any) -> None:
        nonlocal in_handle, most_in_handle
        in_handle += 1
        most_in_handle = max(most_in_handle, in_handle)
        try:
            if not handled:
                await release.wait()  # the first batch is slow to write
            handled.append([r.value for r in records])
        finally:
            in_handle -= 1

    loop = BatchLoop(settings, handle, early=early)
    running = asyncio.create_task(loop.run())
    try:
        first = [f"a{i}".encode() for i in range(10)]
        second = [f"b{i}".encode() for i in range(10)]
        await _produce(bootstrap, topics.events, first)
        async with asyncio.timeout(30):
            while not seen_early:
                await asyncio.sleep(0.02)
        await _produce(bootstrap, topics.events, second)
        async with asyncio.timeout(30):  # the second batch shows up early, the first not done
            while len(seen_early) < 2:
                await asyncio.sleep(0.02)
        assert handled == [] and in_handle == 1
        release.set()
        async with asyncio.timeout(30):
            while len(handled) < 2:
                await asyncio.sleep(0.02)
        assert seen_early == [first, second]
        assert handled == [first, second]
        assert most_in_handle == 1
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
