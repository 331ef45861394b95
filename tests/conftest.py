"""Shared fixtures: the real broker (tansu), real ClickHouse (chDB) and real Ray.

One of each per test session (they are slow to start); tests isolate themselves
with their own topics, their own ClickHouse database and their own consumer group.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from infra.adapters.clickhouse.store import ClickHouseStore
from infra.adapters.kafka.broker import EmbeddedBroker
from infra.adapters.kafka.clients import ensure_topics
from infra.config import Settings, load_config

SERVER_BOOTSTRAP = "CHATLLM_TEST_BOOTSTRAP"
SERVER_CLICKHOUSE = "CHATLLM_TEST_CLICKHOUSE_URL"
"""Set by the server suite (`make test-servers`, tests/servers): the same tests then run
against Apache Kafka and a ClickHouse server instead of tansu and chDB."""


@dataclass(frozen=True)
class ServerBroker:
    """A Kafka cluster someone else runs (the server suite's container)."""

    bootstrap_servers: str


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker | ServerBroker]:
    if os.environ.get(SERVER_BOOTSTRAP):
        yield ServerBroker(os.environ[SERVER_BOOTSTRAP])
        return
    with EmbeddedBroker() as running:
        yield running


@pytest.fixture(scope="session")
def chdb_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # chDB allows one data path per process: the whole session shares this one.
    return tmp_path_factory.mktemp("chdb") / "data"


@pytest.fixture
def database() -> str:
    return f"t_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def store(chdb_path: Path, database: str) -> Iterator[ClickHouseStore]:
    settings = make_settings(chdb_path=chdb_path, database=database)
    opened = ClickHouseStore(settings.clickhouse).open()
    opened.migrate()
    try:
        yield opened
    finally:
        opened.client.command(f"DROP DATABASE IF EXISTS {database}")
        opened.close()


@dataclass(frozen=True)
class Topics:
    events: str
    ingest: str
    deadletter: str
    observations: str


@pytest.fixture
def topics(broker: EmbeddedBroker) -> Topics:
    suffix = uuid.uuid4().hex[:8]
    names = Topics(f"events-{suffix}", f"ingest-{suffix}", f"dlq-{suffix}", f"obs-{suffix}")
    asyncio.run(ensure_topics(broker.bootstrap_servers, vars(names).values(), partitions=4))
    return names


@pytest.fixture(scope="session")
def ray_runtime() -> Iterator[Any]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, namespace="chatllm-tests", log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def make_settings(
    *,
    chdb_path: Path | None = None,
    database: str = "chatllm",
    broker: EmbeddedBroker | ServerBroker | None = None,
    topics: Topics | None = None,
    datadir: Path | None = None,
    **overrides: Any,
) -> Settings:
    """Settings for a test, built through the real loader (so they are validated)."""
    values: dict[str, Any] = {"clickhouse.database": database}
    if os.environ.get(SERVER_CLICKHOUSE):
        values["clickhouse.url"] = os.environ[SERVER_CLICKHOUSE]
    elif chdb_path is not None:
        values["clickhouse.path"] = str(chdb_path)
    if broker is not None:
        values["broker.bootstrap_servers"] = broker.bootstrap_servers
        if isinstance(broker, ServerBroker):
            values["broker.enable_idempotence"] = True  # tansu refuses it; Kafka takes it
    if topics is not None:
        values |= {
            "topics.events": topics.events,
            "topics.ingest": topics.ingest,
            "topics.deadletter": topics.deadletter,
            "topics.observations": topics.observations,
        }
    if datadir is not None:
        values["streams.datadir"] = str(datadir)
    values |= {key.replace("__", "."): value for key, value in overrides.items()}
    return load_config(env={}, overrides=values).settings
