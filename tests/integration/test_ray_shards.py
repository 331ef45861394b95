"""Chat shards on real Ray, writing to the real broker."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from actors.chat import ChatRequest, TurnOutcome
from actors.context import ContextRejected, RequestMeta
from actors.ports import ChatMessage
from infra.adapters.kafka.broker import EmbeddedBroker
from infra.adapters.kafka.clients import KafkaStreamReader
from infra.ray.gateway import Gateway, shard_index
from infra.runtime import start_shards
from tests.conftest import Topics, make_settings

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def shards_with(
    ray_runtime: Any, broker: EmbeddedBroker, topics: Topics, **overrides: Any
) -> Iterator[list[Any]]:
    """Two shards on real Ray (a restarted one waits out its predecessor's 1.5 s lease),
    with `overrides` of the test settings; killed afterwards."""
    settings = make_settings(
        broker=broker, topics=topics, ray__shards=2, ray__lease_ttl_s=1.5, **overrides
    )
    started = start_shards(settings, broker.bootstrap_servers)
    try:
        yield started
    finally:
        for shard in started:
            ray_runtime.kill(shard)


async def restarted(owner: Any, timeout_s: float = 60) -> None:
    """Until Ray's new incarnation of a killed shard answers (ray.kill is asynchronous:
    until then calls may still reach the old one; the new one holds no context yet)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if await owner.ready.remote() == 0:
                return
        except Exception:  # unavailable while restarting
            pass
        assert time.monotonic() < deadline, "the shard was not restarted"
        await asyncio.sleep(0.1)


@pytest.fixture(params=["socket", "ray"])
def transport(request: pytest.FixtureRequest) -> str:
    """How the gateway reaches a shard: each turn test runs against both (the port's
    contract: the direct connection must behave as the actor call does)."""
    return str(request.param)


@pytest.fixture
def shards(ray_runtime: Any, broker: EmbeddedBroker, topics: Topics) -> Iterator[list[Any]]:
    with shards_with(
        ray_runtime, broker, topics, limits__user="30/minute", limits__rate_per_s=0
    ) as started:
        yield started


def ask(context: str, text: str, tenant: str = "t1", user: str = "u1") -> ChatRequest:
    meta = RequestMeta(
        context_id=context,
        tenant_id=tenant,
        user_id=user,
        trace_id=uuid.uuid4().hex,
        correlation_id=str(uuid.uuid4()),
    )
    return ChatRequest(meta=meta, messages=(ChatMessage(role="user", content=text),))


def turn_length(outcome: TurnOutcome) -> int:
    return len(outcome.events)


async def test_turns_over_many_contexts_are_gapless_and_on_the_log(
    shards: list[Any], broker: EmbeddedBroker, topics: Topics, transport: str
) -> None:
    gateway = Gateway(shards, [], transport)
    contexts = [f"ctx-{uuid.uuid4().hex[:6]}" for _ in range(6)]
    # Step 1: 4 turns on each of 6 contexts, all in flight at once, for two tenants.
    turns = await asyncio.gather(
        *(
            gateway.turn(ask(c, f"message {i}", tenant=f"tenant-{n % 2}", user=f"user-{n}"))
            for n, c in enumerate(contexts)
            for i in range(4)
        )
    )
    assert all(t.status == "ok" for t in turns)
    # Step 2: each context's log is gapless from 1, and is exactly what the callers got back.
    reader = KafkaStreamReader(broker.bootstrap_servers, topics.events)
    for context in contexts:
        logged = await reader.read_stream(context)
        assert [e.stream_version for e in logged] == list(range(1, len(logged) + 1))
        returned = sorted(
            (e for t in turns if t.context_id == context for e in t.events),
            key=lambda e: e.stream_version,
        )
        assert [(r.event_id, r.type, r.stream_version) for r in returned] == [
            (e.event_id, e.type, e.stream_version) for e in logged
        ]
        assert [e.type for e in logged].count("ReplyCompleted") == 4


async def test_a_killed_shard_is_restarted_and_rebuilds_its_contexts_from_the_log(
    shards: list[Any], ray_runtime: Any, transport: str
) -> None:
    gateway = Gateway(shards, [], transport)
    context = f"ctx-{uuid.uuid4().hex[:6]}"
    first = await gateway.turn(ask(context, "one"))
    second = await gateway.turn(ask(context, "two"))
    last_version = second.events[-1].stream_version
    # Step 1: the shard process owning the tenant is killed; Ray restarts the actor.
    owner = shards[shard_index("t1", len(shards))]
    ray_runtime.kill(owner, no_restart=False)
    # Step 2: wait until the restarted actor answers (ray.kill is asynchronous: until then
    # calls may still reach the old one). A fresh actor holds no context yet.
    await restarted(owner)
    # Step 3: the next turn makes the fresh actor rebuild the context from the log first.
    third = await gateway.turn(ask(context, "three"))
    assert third.events[0].stream_version == last_version + 1  # no reuse, no gap
    assert "turn 3" in third.reply  # the rebuilt conversation has all three user messages
    assert turn_length(first) > turn_length(second)  # the first turn also created the context


async def test_domain_errors_cross_the_actor_boundary_as_themselves(
    shards: list[Any], transport: str
) -> None:
    gateway = Gateway(shards, [], transport)
    context = f"ctx-{uuid.uuid4().hex[:6]}"
    await gateway.turn(ask(context, "mine", tenant="t1"))
    # Another tenant owned by the same shard asks for the context.
    other = next(
        t for t in (f"t{i}" for i in range(2, 100)) if shard_index(t, 2) == shard_index("t1", 2)
    )
    with pytest.raises(ContextRejected, match="another tenant"):
        await gateway.turn(ask(context, "not yours", tenant=other))
    with pytest.raises(ContextRejected, match="another tenant"):
        async for _ in gateway.stream(ask(context, "not yours", tenant=other)):
            pass


async def test_limits_are_exact_under_real_concurrency(
    shards: list[Any], broker: EmbeddedBroker, topics: Topics, transport: str
) -> None:
    gateway = Gateway(shards, [], transport)
    tenant = f"tenant-{uuid.uuid4().hex[:6]}"
    # 100 requests of one user at once, over 10 contexts, against a limit of 30 per minute.
    outcomes = await asyncio.gather(
        *(gateway.turn(ask(f"{tenant}-c{i % 10}", f"q{i}", tenant=tenant)) for i in range(100))
    )
    allowed = [o for o in outcomes if o.status == "ok"]
    denied = [o for o in outcomes if o.status == "denied"]
    assert len(allowed) == 30 and len(denied) == 70
    assert all(o.retry_after_s > 0 for o in denied)
    # Every denial is in the log, in the stream of the context it was asked in.
    reader = KafkaStreamReader(broker.bootstrap_servers, topics.events)
    logged = [e for i in range(10) for e in await reader.read_stream(f"{tenant}-c{i}")]
    decisions = [e.payload for e in logged if e.type == "RateLimitChecked"]
    assert sum(not d.allowed for d in decisions) == 70
    assert sum(d.allowed for d in decisions) == 30


async def test_streaming_turns_come_back_piece_by_piece(shards: list[Any], transport: str) -> None:
    gateway = Gateway(shards, [], transport)
    items = [
        item
        async for item in gateway.stream(ask(f"s-{uuid.uuid4().hex[:6]}", "stream this please"))
    ]
    pieces, outcome = items[:-1], items[-1]
    assert isinstance(outcome, TurnOutcome) and outcome.status == "ok"
    assert len(pieces) > 3 and "".join(pieces) == outcome.reply  # type: ignore[arg-type]


async def test_a_restarted_shard_still_enforces_the_limits_it_had(
    shards: list[Any], ray_runtime: Any, transport: str
) -> None:
    gateway = Gateway(shards, [], transport)
    tenant = f"tenant-{uuid.uuid4().hex[:6]}"
    # Step 1: the user spends the whole budget (30 per minute).
    spent = await asyncio.gather(
        *(gateway.turn(ask(f"{tenant}-c", f"q{i}", tenant=tenant)) for i in range(30))
    )
    assert all(o.status == "ok" for o in spent)
    # Step 2: the shard that owns the tenant dies and Ray restarts it, memory empty.
    owner = shards[shard_index(tenant, len(shards))]
    ray_runtime.kill(owner, no_restart=False)
    deadline = time.monotonic() + 60
    while True:
        try:
            if await owner.ready.remote() == 0:  # ready() replays the recorded decisions
                break
        except Exception:  # unavailable while restarting
            pass
        assert time.monotonic() < deadline, "the shard was not restarted"
        await asyncio.sleep(0.1)
    # Step 3: the restarted shard remembers: the next request is denied, not a fresh budget.
    after = await gateway.turn(ask(f"{tenant}-c", "one more", tenant=tenant))
    assert after.status == "denied" and 0 < after.retry_after_s <= 60


async def test_a_stale_second_writer_loses_and_writes_nothing(
    ray_runtime: Any, broker: EmbeddedBroker, topics: Topics
) -> None:
    from infra.ray.lease import LeaseLost, LeaseRegistry
    from infra.ray.shard import ChatShard

    settings = make_settings(
        broker=broker, topics=topics, ray__lease_ttl_s=3.0, limits__rate_per_s=0
    )
    # A lease of 3 s: on a loaded machine 1.5 s ran out before the old shard's first write.
    registry = ray_runtime.remote(LeaseRegistry).options(num_cpus=0).remote(3.0)
    context = f"ctx-{uuid.uuid4().hex[:6]}"
    # Step 1: the shard that owns tenant t1 writes a turn.
    old = ChatShard(settings, broker.bootstrap_servers, 0, 1, registry)
    await old.ready()
    await old.turn(ask(context, "one"))
    # Step 2: a replacement for the same shard index comes up while the old one still runs
    # (what Ray does when it believes a shard died): it waits out the old lease, then writes.
    new = ChatShard(settings, broker.bootstrap_servers, 0, 1, registry)
    await new.ready()
    second = await new.turn(ask(context, "two"))
    # Step 3: the stale writer tries again: it loses with a version conflict.
    with pytest.raises(LeaseLost):
        await old.turn(ask(context, "stale"))
    # Over HTTP, as the README says: a 409 in OpenAI's shape that names the conflict.
    answer = await _http_turn(old, context, "stale again")
    assert answer.status_code == 409, answer.text
    assert answer.json()["error"]["code"] == "version_conflict"
    assert "concurrent writer on this context" in answer.json()["error"]["message"]
    # Nothing of the stale attempt is in the log: the stream is gapless and ends at "two".
    reader = KafkaStreamReader(broker.bootstrap_servers, topics.events)
    logged = await reader.read_stream(context)
    assert [e.stream_version for e in logged] == list(range(1, len(logged) + 1))
    assert logged[-1].event_id == second.events[-1].event_id
    assert not any(getattr(e.payload, "content", "") == "stale" for e in logged)
    await new.shutdown()
    await old.shutdown()


async def _http_turn(shard: Any, context: str, text: str) -> Any:
    """A turn through the HTTP API (in process) whose gateway is `shard` itself."""
    import httpx

    from infra.config import load_config
    from infra.http.app import build_api

    class Direct:
        models = ("demo-1",)

        async def turn(self, request: ChatRequest) -> TurnOutcome:
            return await shard.turn(request)  # type: ignore[no-any-return]

    app = build_api(gateway=Direct(), store=None, settings=load_config(env={}).settings,  # type: ignore[arg-type]
                    archive_stats=lambda: (0, 0))  # fmt: skip
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://api"
    ) as http:
        return await http.post(f"/v1/contexts/{context}/messages", json={"content": text},
                               headers={"X-Tenant-Id": "t1"})  # fmt: skip
