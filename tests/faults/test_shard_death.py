"""Fault: the Ray actor that owns a conversation dies in the middle of a turn.

Must hold: the caller gets a clear error (503 that says what happened), never a half turn
in the log (a turn is appended completely or not at all); the restarted actor rebuilds the
context exactly from the log, and the next turn continues its stream without a gap.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from infra.adapters.kafka.broker import EmbeddedBroker
from infra.adapters.kafka.clients import KafkaStreamReader
from infra.config import load_config
from infra.http.app import build_api
from infra.ray.gateway import Gateway, shard_index
from tests.conftest import Topics
from tests.integration.test_ray_shards import ask, restarted, shards_with, transport

pytestmark = pytest.mark.integration
__all__ = ["transport"]  # the fixture, shared with the shard tests


@pytest.fixture
def slow_shards(ray_runtime: Any, broker: EmbeddedBroker, topics: Topics) -> Iterator[list[Any]]:
    with shards_with(
        ray_runtime, broker, topics, model__demo_latency_ms=2500, limits__rate_per_s=0
    ) as started:
        yield started


async def test_a_shard_killed_mid_turn(
    slow_shards: list[Any], ray_runtime: Any, broker: EmbeddedBroker, topics: Topics, transport: str
) -> None:
    gateway = Gateway(slow_shards, [], transport)
    tenant, context = f"t-{uuid.uuid4().hex[:6]}", f"ctx-{uuid.uuid4().hex[:6]}"
    first = await gateway.turn(ask(context, "first", tenant=tenant))
    assert first.status == "ok"

    # Step 1: the owner dies while the model is still answering the second turn, asked over
    # HTTP (the API in process, on this gateway): the caller gets a clear 503.
    app = build_api(gateway=gateway, store=None, settings=load_config(env={}).settings,  # type: ignore[arg-type]
                    archive_stats=lambda: (0, 0))  # fmt: skip
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api")
    turn = asyncio.create_task(
        http.post(f"/v1/contexts/{context}/messages", json={"content": "second"},
                  headers={"X-Tenant-Id": tenant}, timeout=60)
    )  # fmt: skip
    await asyncio.sleep(1.0)
    owner = slow_shards[shard_index(tenant, len(slow_shards))]
    ray_runtime.kill(owner, no_restart=False)
    answer = await turn
    await http.aclose()
    assert answer.status_code == 503, answer.text
    error = answer.json()["error"]
    assert error["code"] == "shard_restarting" and "stopped during the request" in error["message"]
    assert answer.headers["retry-after"] == "2"
    assert "Traceback" not in answer.text and "pid=" not in answer.text  # no internals

    # Step 2: the log holds whole turns only: the first, and nothing of the second.
    reader = KafkaStreamReader(broker.bootstrap_servers, topics.events)
    logged = await reader.read_stream(context)
    assert [e.stream_version for e in logged] == list(range(1, len(logged) + 1))
    asked = [e for e in logged if e.type == "MessageReceived"]
    answered = [e for e in logged if e.type in ("ReplyCompleted", "ReplyFailed")]
    assert len(asked) == len(answered) == 1

    # Step 3: the restarted actor rebuilds the context from the log; the next turn goes on
    # from the last version, and the conversation is the logged one plus this turn.
    await restarted(owner)
    third = await gateway.turn(ask(context, "third", tenant=tenant))
    assert third.status == "ok"
    assert third.events[0].stream_version == logged[-1].stream_version + 1
    view = await gateway.view(ask(context, "-", tenant=tenant).meta)
    assert view.messages == 4  # first + its reply, third + its reply
