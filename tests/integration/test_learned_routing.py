"""Routing that learns from feedback, on real Ray and the real broker: feedback that favours
one model moves the band's traffic to it, and a restarted shard keeps what it learned
(rebuilt from the FeedbackGiven events in the log)."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any, Literal

import pytest

from actors.context import ContextCommand
from events import FeedbackGiven
from infra.adapters.kafka.broker import EmbeddedBroker
from infra.ray.gateway import Gateway, shard_index
from tests.conftest import Topics
from tests.integration.test_ray_shards import ask, shards_with
from tests.integration.test_ray_shards import restarted as restarted_shard

pytestmark = pytest.mark.integration

BANDS = [
    {"name": "simple", "max_complexity": 0.25, "model": "demo-fast",
     "candidates": ["demo-fast", "demo-1"]},
    {"name": "standard", "max_complexity": 1.0, "model": "demo-large"},
]  # fmt: skip


@pytest.fixture
def shards(ray_runtime: Any, broker: EmbeddedBroker, topics: Topics) -> Iterator[list[Any]]:
    with shards_with(
        ray_runtime, broker, topics,
        limits__rate_per_s=0, limits__user="10000/minute", routing__bands=BANDS,
        routing__learning__enabled=True, routing__learning__max_explore=0.2,
    ) as started:  # fmt: skip
        yield started


async def requests(gateway: Gateway, tenant: str, n: int) -> list[Any]:
    """n one-line questions, each in a new context (no sticky model)."""
    asks = [ask(f"{tenant}-{uuid.uuid4().hex[:8]}", f"hi {i}", tenant=tenant) for i in range(n)]
    outcomes = await asyncio.gather(*(gateway.turn(a) for a in asks))
    assert all(o.status == "ok" for o in outcomes)
    return list(outcomes)


def share(outcomes: list[Any], model: str) -> float:
    return Counter(o.model for o in outcomes)[model] / len(outcomes)


async def test_feedback_moves_traffic_and_a_restarted_shard_keeps_it(
    shards: list[Any], ray_runtime: Any
) -> None:
    gateway = Gateway(shards, [])
    tenant = f"tenant-{uuid.uuid4().hex[:6]}"

    # Step 1: with no feedback yet, the band's table model takes most of the traffic;
    # at most max_explore (0.2) explores.
    before = await requests(gateway, tenant, 60)
    assert share(before, "demo-fast") >= 0.65

    # Step 2: users dislike demo-fast's replies and like demo-1's.
    for outcome in before:
        thumbs: Literal["up", "down"] = "up" if outcome.model == "demo-1" else "down"
        meta = ask(outcome.context_id, "-", tenant=tenant).meta
        feedback = FeedbackGiven(message_id=outcome.message_id, thumbs=thumbs)
        await gateway.command(ContextCommand(meta=meta, feedback=feedback))

    # Step 3: the band's traffic moves to demo-1.
    after = await requests(gateway, tenant, 60)
    assert share(after, "demo-1") >= 0.65, Counter(o.model for o in after)

    # Step 4: the shard dies and Ray restarts it with an empty memory; it rebuilds what it
    # learned from the log, and keeps routing to demo-1.
    owner = shards[shard_index(tenant, len(shards))]
    ray_runtime.kill(owner, no_restart=False)
    await restarted_shard(owner)
    restarted = await requests(gateway, tenant, 60)
    assert share(restarted, "demo-1") >= 0.65, Counter(o.model for o in restarted)
