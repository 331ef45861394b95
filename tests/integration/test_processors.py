"""The stateful detectors on Faust (infra/services/processors.py) against the real broker:
state that comes back from the changelog after a SIGKILL, one key judged by one worker of a group,
state that moves with its partition, and bad records dead-lettered while the agents go on.

Each worker is a real `chatllm worker --processors` process."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiokafka import AIOKafkaProducer

from events import Envelope, ReplyCompleted, encode, topics
from events.observations import Observation, encode_batch
from infra.adapters.inmemory import InMemoryProjections
from infra.adapters.kafka.broker import EmbeddedBroker
from infra.adapters.kafka.clients import KafkaStreamReader, partition_for
from infra.config import ENV_PREFIX, Settings, settings_env
from infra.services.processors import read_status
from tests.conftest import Topics, make_settings
from tests.factories import make_event

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MODEL = "m-proc"


@pytest.fixture
def settings(broker: EmbeddedBroker, topics: Topics, tmp_path: Path) -> Settings:
    s = make_settings(
        broker=broker,
        topics=topics,
        datadir=tmp_path / "work",
        anomalies__latency_warmup=20,
        anomalies__latency_min_ms=50,
        anomalies__cooldown_s=0,
        log__level="INFO",
    )
    return s


def start_worker(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env |= settings_env(settings) | {f"{ENV_PREFIX}CONFIG": os.devnull}
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "infra.cli", "worker", "--processors"],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@pytest.fixture
def workers(settings: Settings, tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for w in started:
        if w.poll() is None:
            w.send_signal(signal.SIGKILL)
        w.wait()


def statuses(settings: Settings, alive: list[subprocess.Popen[bytes]]) -> dict[int, Any]:
    pids = {w.pid for w in alive if w.poll() is None}
    return {s["pid"]: s for s in read_status(settings) if s["pid"] in pids and not s["stale"]}


def wait_for(what: str, check: Any, timeout_s: float = 90.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def settled(settings: Settings, alive: list[subprocess.Popen[bytes]], count: int) -> Any:
    """Until `count` live workers hold every observation partition between them, none of
    them recovering."""

    def check() -> Any:
        found = statuses(settings, alive)
        owned = [tp for s in found.values() for tp in s["assigned"]]
        ready = (
            len(found) == count
            and sorted(owned) == sorted(set(owned))
            and len(owned) == settings.topics.partitions
            and not any(s["recovering"] for s in found.values())
        )
        return found if ready else None

    return wait_for(f"{count} worker(s) to own the partitions", check)


def owner_of(found: dict[int, Any], settings: Settings, key: str) -> int:
    partition = partition_for(key, range(settings.topics.partitions))
    name = f"{settings.topics.observations}/{partition}"
    (pid,) = [pid for pid, s in found.items() if name in s["assigned"]]
    return pid


async def publish(
    settings: Settings, records: list[tuple[bytes, bytes]], wait_each: bool = True
) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.broker.bootstrap_servers, acks="all", linger_ms=20
    )
    await producer.start()
    try:
        sent = []
        for key, value in records:
            sent.append(await producer.send(settings.topics.observations, key=key, value=value))
            if wait_each:
                await sent[-1]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


def turns(latencies: list[float], start: datetime, tenant: str = "t1") -> bytes:
    return encode_batch(
        [
            Observation(
                kind="turn",
                at=start + timedelta(milliseconds=i),
                tenant_id=tenant,
                subject=MODEL,
                context_id=f"ctx-{i}",
                latency_ms=latency,
            )
            for i, latency in enumerate(latencies)
        ]
    )


async def read_findings(settings: Settings, detector: str = "latency_baseline") -> list[Any]:
    reader = KafkaStreamReader(settings.broker.bootstrap_servers, settings.topics.events)
    events = await reader.read_types({"AnomalyDetected"})
    return [e for e in events if e.payload.detector == detector]


def findings(settings: Settings, detector: str = "latency_baseline") -> list[Any]:
    return asyncio.run(read_findings(settings, detector))


def warm_up(settings: Settings, alive: list[subprocess.Popen[bytes]], n: int = 40) -> None:
    """n ordinary replies of MODEL, one record each (so the changelog gets many writes in
    few batches), judged and their state written."""
    start = datetime.now(UTC)
    records = [(f"model:{MODEL}".encode(), turns([20.0 + i % 3], start)) for i in range(n)]
    asyncio.run(publish(settings, records, wait_each=False))
    wait_for(
        "the warm-up to be judged",
        lambda: sum(s["observations"] for s in statuses(settings, alive).values()) >= n,
    )
    time.sleep(2 * settings.streams.commit_interval_s + 1)  # offsets and changelog flushed


def spike(settings: Settings) -> None:
    asyncio.run(publish(settings, [(f"model:{MODEL}".encode(), turns([900.0], datetime.now(UTC)))]))


def test_state_comes_back_from_the_changelog_after_a_sigkill(
    settings: Settings, workers: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    workers.append(start_worker(settings, tmp_path / "w1.log"))
    settled(settings, workers, 1)
    warm_up(settings, workers)
    assert findings(settings) == []
    # Step 1: the worker dies without a goodbye; a new one starts with empty memory.
    workers[0].send_signal(signal.SIGKILL)
    workers[0].wait()
    workers.append(start_worker(settings, tmp_path / "w2.log"))
    settled(settings, workers, 1)
    # Step 2: the first spike after the restart is flagged: the baseline was recovered
    # (a cold one would need 20 replies before it judges anything).
    spike(settings)
    found = wait_for("the spike's finding", lambda: findings(settings), 60)
    assert len(found) == 1 and found[0].payload.observed == 900.0
    assert found[0].payload.subject == MODEL and found[0].payload.baseline < 30


def test_two_workers_judge_a_key_once_by_its_owner(
    settings: Settings, workers: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    from infra.adapters.kafka.clients import KafkaObservationSink
    from infra.wiring import worker_settings
    from streams.app import ProjectionWorker

    workers += [start_worker(settings, tmp_path / f"w{i}.log") for i in range(2)]
    found = settled(settings, workers, 2)
    owner = owner_of(found, settings, f"model:{MODEL}")
    # The model's replies are spread over every partition of the events topic (one
    # context each); the archive writer turns them into observations keyed by model.
    bootstrap = settings.broker.bootstrap_servers
    archive = ProjectionWorker(
        worker_settings(settings, bootstrap),
        InMemoryProjections(),
        observations=KafkaObservationSink(bootstrap, settings.topics.observations, settings.broker),
    )
    base = datetime.now(UTC)

    def reply(i: int, latency: float) -> Envelope[Any]:
        payload = ReplyCompleted(
            message_id=f"r{i}", in_reply_to=f"m{i}", model=MODEL, latency_ms=latency, content="ok"
        )
        event = make_event(f"ctx-split-{i}", 1, payload, n=10_000 + i)
        return msgspec.structs.replace(event, occurred_at=base + timedelta(milliseconds=i))

    replies = [reply(i, 20.0 + i % 3) for i in range(40)] + [reply(99, 900.0)]
    partitions = {partition_for(e.stream_id, range(4)) for e in replies}
    assert partitions == {0, 1, 2, 3}

    async def run() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        async with archive.running():
            for e in replies[:-1]:
                await producer.send_and_wait(
                    settings.topics.events, key=e.stream_id.encode(), value=encode(e)
                )
            await asyncio.sleep(3)  # judged as warm-up first
            await producer.send_and_wait(
                settings.topics.events,
                key=replies[-1].stream_id.encode(),
                value=encode(replies[-1]),
            )
            await asyncio.sleep(1)
            deadline = time.monotonic() + 60
            while not await read_findings(settings) and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
        await producer.stop()

    asyncio.run(run())
    time.sleep(3)  # a second (wrong) finding would have arrived by now
    found_events = findings(settings)
    seen = {
        pid: (s["observations"], s["assigned"]) for pid, s in statuses(settings, workers).items()
    }
    assert len(found_events) == 1, (archive.written, archive.observed, seen)
    assert found_events[0].payload.observed == 900.0
    by_worker = {pid: s["findings"] for pid, s in statuses(settings, workers).items()}
    assert by_worker[owner] == 1 and sum(by_worker.values()) == 1


def test_a_stopped_workers_keys_move_with_their_state(
    settings: Settings, workers: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    workers += [start_worker(settings, tmp_path / f"w{i}.log") for i in range(2)]
    found = settled(settings, workers, 2)
    warm_up(settings, workers)
    owner = owner_of(found, settings, f"model:{MODEL}")
    # The owner stops; the other takes its partitions and recovers their state.
    stopping = next(w for w in workers if w.pid == owner)
    stopping.send_signal(signal.SIGTERM)
    stopping.wait(60)
    after = settled(settings, workers, 1)
    assert owner not in after
    spike(settings)
    got = wait_for("the spike's finding", lambda: findings(settings), 60)
    assert len(got) == 1 and got[0].payload.subject == MODEL


def test_bad_records_are_dead_lettered_and_the_agents_go_on(
    settings: Settings, workers: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    workers.append(start_worker(settings, tmp_path / "w1.log"))
    settled(settings, workers, 1)
    bad = [
        (f"model:{MODEL}".encode(), b"not json at all"),
        (f"model:{MODEL}".encode(), b'[{"kind": "turn"}]'),  # fields missing
        (b"weather:lisbon", encode_batch([])),  # no detector's key
    ]
    asyncio.run(publish(settings, bad))
    warm_up(settings, workers, 20)
    spike(settings)
    assert wait_for("the spike's finding", lambda: findings(settings), 60)
    letters = asyncio.run(_dead_letters(settings))
    reasons = sorted(reason for _, reason in letters)
    assert len(letters) == 3, reasons
    assert any(r.startswith("bad observations: JSON is malformed") for r in reasons), reasons
    assert any(r.startswith("bad observations: Object missing required field") for r in reasons)
    assert "unknown observation key 'weather:lisbon'" in reasons
    assert {value for value, _ in letters} == {value for _, value in bad}


async def _dead_letters(settings: Settings) -> list[tuple[bytes, str]]:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        settings.topics.deadletter,
        bootstrap_servers=settings.broker.bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    out = []
    try:
        while True:
            fetched = await consumer.getmany(timeout_ms=2000)
            if not fetched:
                return out
            for records in fetched.values():
                for r in records:
                    headers = dict(r.headers)
                    out.append((r.value, headers[topics.DLQ_REASON].decode()))
    finally:
        await consumer.stop()


def test_the_end_of_a_partition_is_read_from_a_fetch(settings: Settings) -> None:
    """Faust's table recovery reads up to each changelog partition's end; the embedded
    broker's ListOffsets can report less than the log holds, so the end comes from a fetch
    (infra/processors.fetched_highwaters), which this checks against what was written."""
    from aiokafka import TopicPartition

    from infra.services.processors import fetched_highwaters

    async def run() -> tuple[int, dict[Any, int]]:
        producer = AIOKafkaProducer(
            bootstrap_servers=settings.broker.bootstrap_servers, acks="all", linger_ms=50
        )
        await producer.start()
        sent = [
            await producer.send(settings.topics.observations, value=b"x", partition=0)
            for _ in range(1000)
        ]
        last = max(m.offset for m in await asyncio.gather(*sent))
        await producer.stop()
        tp = TopicPartition(settings.topics.observations, 0)
        return last, await fetched_highwaters(settings.broker.bootstrap_servers, [tp])

    last, ends = asyncio.run(run())
    assert list(ends.values()) == [last + 1] == [1000]
