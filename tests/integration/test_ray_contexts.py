"""Context actors hosted on real Ray, writing to the real broker."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from actors.context import ContextRejected, SendMessage
from infra.broker import EmbeddedBroker
from infra.gateway import Gateway, host_index
from infra.kafka import KafkaStreamReader
from infra.runtime import start_context_hosts
from tests.conftest import Topics, make_settings

pytestmark = pytest.mark.integration


@pytest.fixture
def hosts(ray_runtime: Any, broker: EmbeddedBroker, topics: Topics) -> Iterator[list[Any]]:
    settings = make_settings(broker=broker, topics=topics, ray__context_hosts=2)
    started = start_context_hosts(settings, broker.bootstrap_servers)
    try:
        yield started
    finally:
        for host in started:
            ray_runtime.kill(host)


def say(context: str, text: str, tenant: str = "t1") -> SendMessage:
    return SendMessage(
        context_id=context,
        tenant_id=tenant,
        user_id="u1",
        content=text,
        trace_id=uuid.uuid4().hex,
        correlation_id=str(uuid.uuid4()),
    )


async def test_turns_over_many_contexts_are_gapless_and_on_the_log(
    hosts: list[Any], broker: EmbeddedBroker, topics: Topics
) -> None:
    gateway = Gateway(hosts)
    contexts = [f"ctx-{uuid.uuid4().hex[:6]}" for _ in range(6)]
    # Step 1: 4 turns on each of 6 contexts, all in flight at once.
    turns = await asyncio.gather(
        *(gateway.chat(say(c, f"message {i}")) for c in contexts for i in range(4))
    )
    assert all(t.ok for t in turns)
    # Step 2: each context's log is exactly 1..9 (created + 4 x (message, reply)), no gap.
    reader = KafkaStreamReader(broker.bootstrap_servers, topics.events)
    for context in contexts:
        logged = await reader.read_stream(context)
        assert [e.stream_version for e in logged] == list(range(1, 10))
        returned = sorted(
            (e for t in turns if t.context_id == context for e in t.events),
            key=lambda e: e.stream_version,
        )
        assert returned == logged


async def test_a_killed_host_is_restarted_and_rebuilds_its_contexts_from_the_log(
    hosts: list[Any], ray_runtime: Any, broker: EmbeddedBroker
) -> None:
    gateway = Gateway(hosts)
    context = f"ctx-{uuid.uuid4().hex[:6]}"
    for text in ("one", "two"):
        await gateway.chat(say(context, text))
    # Step 1: the host process owning the context is killed; Ray restarts the actor.
    owner = hosts[host_index(context, len(hosts))]
    ray_runtime.kill(owner, no_restart=False)
    # Step 2: wait until the restarted actor answers (ray.kill is asynchronous: until then
    # calls may still reach the old one). A fresh actor holds no context yet.
    deadline = time.monotonic() + 60
    while True:
        try:
            if await owner.ready.remote() == 0:
                break
        except Exception:  # unavailable while restarting
            pass
        assert time.monotonic() < deadline, "the host was not restarted"
        await asyncio.sleep(0.1)
    # Step 3: the next turn makes the fresh actor rebuild the context from the log first.
    turn = await gateway.chat(say(context, "three"))
    # The versions continue where the killed actor stopped: no reuse, no gap.
    assert [e.stream_version for e in turn.events] == [6, 7]
    assert "turn 3" in turn.reply  # the rebuilt conversation has all three user messages


async def test_domain_errors_cross_the_actor_boundary_as_themselves(hosts: list[Any]) -> None:
    gateway = Gateway(hosts)
    context = f"ctx-{uuid.uuid4().hex[:6]}"
    await gateway.chat(say(context, "mine", tenant="t1"))
    with pytest.raises(ContextRejected, match="another tenant"):
        await gateway.chat(say(context, "not yours", tenant="t2"))
