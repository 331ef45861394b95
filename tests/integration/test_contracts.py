"""Contract tests: every port's adapters (in-memory and real) obey the same rules."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pytest

from actors.ports import ChatMessage, EventSink, ModelProvider, StreamReader
from events import Envelope, MemoryPruned, encode
from infra.adapters.clickhouse.store import AsyncStore, ClickHouseStore
from infra.adapters.inmemory import InMemoryLog, InMemoryProjections
from infra.adapters.kafka.broker import EmbeddedBroker
from infra.adapters.kafka.clients import KafkaEventSink, KafkaStreamReader
from infra.adapters.models import DemoModel
from infra.config import BrokerConfig
from streams.archive import ArchiveRow, archive_row
from streams.ports import ProjectionBatch, ProjectionSink
from streams.projections import (
    ANOMALIES_TABLE,
    FACTS_TABLE,
    MEMORY_TYPES,
    PRUNES_TABLE,
    PruneRow,
    fold,
    project,
    table_of,
)
from tests.conftest import Topics
from tests.factories import make_event, make_turn

pytestmark = pytest.mark.integration


# ---- EventSink + StreamReader ---------------------------------------------------


@dataclass
class LogAdapter:
    sink: EventSink
    reader: StreamReader


@pytest.fixture(params=["memory", "kafka"])
async def log_adapter(
    request: pytest.FixtureRequest, broker: EmbeddedBroker, topics: Topics
) -> AsyncIterator[LogAdapter]:
    if request.param == "memory":
        log = InMemoryLog()
        yield LogAdapter(log, log)
        return
    sink = KafkaEventSink(broker.bootstrap_servers, topics.events, BrokerConfig())
    await sink.start()
    try:
        yield LogAdapter(sink, KafkaStreamReader(broker.bootstrap_servers, topics.events))
    finally:
        await sink.stop()


async def test_log_returns_each_stream_in_order_and_nothing_else(log_adapter: LogAdapter) -> None:
    a = [make_event("ctx-a", v, n=v) for v in range(1, 6)]
    b = [make_event("ctx-b", v, n=100 + v) for v in range(1, 4)]
    # Interleaved appends of two streams, in several batches.
    await log_adapter.sink.append(a[:2] + b[:1])
    await log_adapter.sink.append(b[1:] + a[2:])
    assert await log_adapter.reader.read_stream("ctx-a") == a
    assert await log_adapter.reader.read_stream("ctx-b") == b
    assert await log_adapter.reader.read_stream("ctx-unknown") == []


async def test_log_reader_keeps_the_first_copy_of_a_version(log_adapter: LogAdapter) -> None:
    # A producer retry can write an event twice; the stream still has it once.
    events = [make_event("ctx-r", v) for v in range(1, 4)]
    await log_adapter.sink.append(events)
    await log_adapter.sink.append(events[1:2])
    assert await log_adapter.reader.read_stream("ctx-r") == events


async def test_reads_interleaved_with_appends_see_every_stream_whole(
    log_adapter: LogAdapter,
) -> None:
    # The Kafka reader remembers where streams start: later reads scan less, see as much.
    reader, sink = log_adapter.reader, log_adapter.sink
    first = [make_event("ctx-x", v, n=200 + v) for v in range(1, 4)]
    assert await reader.read_stream("ctx-x") == []
    await sink.append([*first[:1], make_event("ctx-y", 1, n=300)])
    assert await reader.read_stream("ctx-x") == first[:1]
    await sink.append([*first[1:], make_event("ctx-z", 1, n=400)])
    assert await reader.read_stream("ctx-y") == [make_event("ctx-y", 1, n=300)]
    assert await reader.read_stream("ctx-x") == first
    assert await reader.read_stream("ctx-z") == [make_event("ctx-z", 1, n=400)]
    assert await reader.read_stream("ctx-never") == []


async def test_log_append_is_durable_before_it_returns(log_adapter: LogAdapter) -> None:
    event = make_event("ctx-d", 1)
    await log_adapter.sink.append([event])
    # A reader created afterwards (no shared state) sees it immediately.
    assert await log_adapter.reader.read_stream("ctx-d") == [event]


async def test_an_append_larger_than_a_producer_batch_arrives_whole_and_in_order(
    log_adapter: LogAdapter,
) -> None:
    # 60 events of 1 KB (several producer batches of 16 KB) with one of 300 KB (larger than
    # any batch by itself) in the middle, interleaved with a second stream.
    from events import MessageReceived

    def sized(stream: str, version: int, size: int, n: int) -> Envelope[Any]:
        payload = MessageReceived(message_id=f"m{version}", content="x" * size)
        return make_event(stream, version, payload, n=n)

    big = [sized("ctx-big", v, 300_000 if v == 30 else 1_000, 500 + v) for v in range(1, 61)]
    other = [sized("ctx-other", v, 1_000, 600 + v) for v in range(1, 4)]
    await log_adapter.sink.append([*big[:20], other[0], *big[20:], *other[1:]])
    assert await log_adapter.reader.read_stream("ctx-big") == big
    assert await log_adapter.reader.read_stream("ctx-other") == other


# ---- ProjectionSink --------------------------------------------------------------


@dataclass
class ArchiveAdapter:
    sink: ProjectionSink
    read: Callable[[str, str], Any]
    table: Callable[[str], Any]
    """Every row of a projection table, deduplicated, as FactRow / AnomalyRow / PruneRow."""


def batch_of(rows: list[ArchiveRow], events: list[Envelope[Any]] | None = None) -> ProjectionBatch:
    batch = ProjectionBatch(archive=list(rows))
    for event in events or []:
        row = project(event)
        if row is None:
            continue
        batch.rows.setdefault(table_of(row), []).append(row)
        if isinstance(row, PruneRow):
            batch.prunes[row.tenant_id] = max(
                row.before, batch.prunes.get(row.tenant_id, row.before)
            )
    return batch


@pytest.fixture(params=["memory", "clickhouse"])
async def archive_adapter(
    request: pytest.FixtureRequest, store: ClickHouseStore
) -> AsyncIterator[ArchiveAdapter]:
    if request.param == "memory":
        archive = InMemoryProjections()

        async def read_memory(tenant: str, stream: str) -> list[tuple[int, str, str]]:
            return [(r.stream_version, r.event_id, r.body) for r in archive.stream(tenant, stream)]

        def table_memory(table: str) -> list[Any]:
            held = archive.tables.get(table, {})
            return [held[k] for k in sorted(held)]

        yield ArchiveAdapter(archive, read_memory, table_memory)
        return
    astore = AsyncStore(store)

    async def read_clickhouse(tenant: str, stream: str) -> list[tuple[int, str, str]]:
        return [
            (r.stream_version, r.event_id, r.body)
            for r in await astore.stream_events(tenant, stream)
        ]

    def table_clickhouse(table: str) -> list[Any]:
        return store.projected_rows(table)

    try:
        yield ArchiveAdapter(astore, read_clickhouse, table_clickhouse)
    finally:
        astore.close()


def rows_for(stream: str, versions: range, tenant: str = "t1") -> list[ArchiveRow]:
    base = uuid.uuid4().int % 10_000 * 1000
    events = [make_event(stream, v, n=base + v, tenant_id=tenant) for v in versions]
    return [
        archive_row(e, encode(e), topic="t", partition=0, offset=i) for i, e in enumerate(events)
    ]


async def test_archive_is_idempotent_by_event_id(archive_adapter: ArchiveAdapter) -> None:
    rows = rows_for("ctx-1", range(1, 6))
    await archive_adapter.sink.write(batch_of(rows))
    # Re-delivery after a crash: the same rows again, partly overlapping.
    await archive_adapter.sink.write(batch_of(rows[2:]))
    await archive_adapter.sink.write(batch_of(rows[:1]))
    stored = await archive_adapter.read("t1", "ctx-1")
    assert [(v, e) for v, e, _ in stored] == [(r.stream_version, r.event_id) for r in rows]
    assert [body for _, _, body in stored] == [r.body for r in rows]


async def test_archive_reads_are_scoped_by_tenant(archive_adapter: ArchiveAdapter) -> None:
    await archive_adapter.sink.write(batch_of(rows_for("shared-id", range(1, 3), tenant="t1")))
    await archive_adapter.sink.write(batch_of(rows_for("shared-id", range(1, 4), tenant="t2")))
    assert len(await archive_adapter.read("t1", "shared-id")) == 2
    assert len(await archive_adapter.read("t2", "shared-id")) == 3
    assert await archive_adapter.read("t3", "shared-id") == []


def _traffic() -> list[Envelope[Any]]:
    events: list[Envelope[Any]] = []
    version = 1
    for n in range(1, 13):
        outcome = "failed" if n % 5 == 0 else "denied" if n % 7 == 0 else "ok"
        turn = make_turn(n, version=version, outcome=outcome, latency_ms=float(n))
        version += len(turn)
        events += turn
    return events


def _prune(n: int, before: datetime, tenant: str = "t1") -> Envelope[Any]:
    return make_event(
        f"memory-prune:{n}",
        1,
        MemoryPruned(before=before, max_age_days=30, entries=1),
        n=n,
        tenant_id=tenant,
    )


async def test_projections_equal_the_fold_whatever_the_redeliveries(
    archive_adapter: ArchiveAdapter,
) -> None:
    events = _traffic()
    archive = [archive_row(e, encode(e), topic="t", partition=0, offset=0) for e in events]
    await archive_adapter.sink.write(batch_of(archive[:40], events[:40]))
    await archive_adapter.sink.write(batch_of(archive[20:], events[20:]))  # redelivered
    await archive_adapter.sink.write(batch_of(archive[:5], events[:5]))
    expected = fold(events)
    for table in (FACTS_TABLE, ANOMALIES_TABLE, PRUNES_TABLE):
        want = [expected[table][k] for k in sorted(expected[table])]
        assert archive_adapter.table(table) == want, table


async def test_a_prune_redacts_older_memory_even_when_it_is_redelivered_later(
    archive_adapter: ArchiveAdapter,
) -> None:
    events = _traffic()
    cutoff = events[len(events) // 2].occurred_at
    prune = _prune(9_000, cutoff)
    archive = [archive_row(e, encode(e), topic="t", partition=0, offset=0) for e in events]
    await archive_adapter.sink.write(batch_of(archive[30:], events[30:]))
    await archive_adapter.sink.write(batch_of([], [prune]))
    # The oldest events arrive after the prune (another partition lagged): still redacted.
    await archive_adapter.sink.write(batch_of(archive[:30], events[:30]))
    expected = fold([*events, prune])
    facts = archive_adapter.table(FACTS_TABLE)
    assert facts == [expected[FACTS_TABLE][k] for k in sorted(expected[FACTS_TABLE])]
    old = [f for f in facts if f.type in MEMORY_TYPES and f.at < cutoff]
    assert old and all(f.text == "" and f.redacted == 1 for f in old)
    assert any(f.text for f in facts if f.at >= cutoff)


from tests.integration.test_openai_provider import upstream  # noqa: E402, F401 (a fixture)

# ---- ModelProvider --------------------------------------------------------------


@pytest.fixture(params=["demo", "openai"])
async def model(request: pytest.FixtureRequest) -> AsyncIterator[ModelProvider]:
    """Each adapter of the port: the demo model, and the OpenAI-compatible provider against
    an OpenAI-compatible server this test starts (benchmarks/mock_upstream.py)."""
    if request.param == "demo":
        yield DemoModel(latency_ms=1)
        return
    from actors.router import Deployment
    from infra.adapters.models import OpenAICompatibleModel

    base, _ = request.getfixturevalue("upstream")
    provider = OpenAICompatibleModel(
        Deployment(name="mock-a", model="mock", provider="openai", base_url=f"{base}/v1")
    )
    try:
        yield provider
    finally:
        await provider.close()


async def test_model_answers_with_its_name_and_token_counts(model: ModelProvider) -> None:
    completion = await model.complete([ChatMessage(role="user", content="what time is it?")])
    assert completion.content
    assert completion.model == model.name
    assert completion.prompt_tokens > 0 and completion.completion_tokens > 0


# ---- Embedder ---------------------------------------------------------------------


@pytest.fixture(params=["hash", "minilm"])
def embedder(request: pytest.FixtureRequest) -> Any:
    from infra.adapters.embeddings import HashEmbedder, MiniLMEmbedder

    return HashEmbedder() if request.param == "hash" else MiniLMEmbedder()


def test_embedder_gives_unit_rows_of_its_dimension_the_same_every_time(embedder: Any) -> None:
    import numpy as np

    texts = ["reset my password", "reset the password", "weather in Lisbon", ""]
    first, again = embedder.embed(texts), embedder.embed(list(reversed(texts)))[::-1]
    assert first.shape == (4, embedder.dimension) and first.dtype == np.float32
    assert np.allclose(np.linalg.norm(first[:3], axis=1), 1.0, atol=1e-5)
    assert np.allclose(first, again, atol=1e-5)  # a text's vector does not depend on its batch
    close, far = float(first[0] @ first[1]), float(first[0] @ first[2])
    assert close > far
    assert embedder.embed([]).shape == (0, embedder.dimension)
