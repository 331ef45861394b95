"""The embedded broker: starts, answers Kafka, stops, and never outlives its parent."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from infra.adapters.kafka.broker import BrokerError, EmbeddedBroker

pytestmark = pytest.mark.integration


def test_start_produce_consume_stop() -> None:
    broker = EmbeddedBroker().start()
    try:

        async def round_trip() -> bytes:
            producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers, acks="all")
            await producer.start()
            await producer.send_and_wait("probe", b"ping", key=b"k")
            await producer.stop()
            consumer = AIOKafkaConsumer(
                "probe", bootstrap_servers=broker.bootstrap_servers, auto_offset_reset="earliest"
            )
            await consumer.start()
            try:
                record = await asyncio.wait_for(consumer.getone(), 10)
            finally:
                await consumer.stop()
            return record.value

        assert asyncio.run(round_trip()) == b"ping"
    finally:
        broker.stop()
    assert not broker.running


def test_a_taken_port_is_a_clear_error(broker: EmbeddedBroker) -> None:
    with pytest.raises(BrokerError, match="already in use"):
        EmbeddedBroker(port=broker.port).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is dead for our purpose.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split()[2] != "Z"


def test_the_broker_dies_with_a_killed_parent() -> None:
    # Step 1: a parent process starts the broker and prints the broker's pid.
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from infra.adapters.kafka.broker import EmbeddedBroker;"
            "b = EmbeddedBroker().start(); print(b._process.pid, flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdout is not None
    child_pid = int(parent.stdout.readline())
    assert _alive(child_pid)
    # Step 2: the parent is SIGKILLed (no atexit, no cleanup code runs).
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    # Step 3: the kernel takes the broker down with it (PR_SET_PDEATHSIG).
    deadline = time.monotonic() + 10
    while _alive(child_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child_pid)
