"""The direct connection to a shard (infra/ray/shardlink.py), attacked: a connection that does
not show the shard's token, a malformed frame and an oversized one get nothing and break
nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import struct
import uuid
from typing import Any

import pytest

from infra.adapters.kafka.broker import EmbeddedBroker
from infra.adapters.kafka.clients import KafkaStreamReader
from infra.ray.gateway import Gateway, shard_index
from infra.ray.shardlink import MAX_FRAME, _pack
from tests.conftest import Topics
from tests.faults.test_shard_death import slow_shards
from tests.integration.test_ray_shards import ask, shards

pytestmark = pytest.mark.integration
__all__ = ["shards", "slow_shards"]  # the fixtures


async def _closed_without_answer(reader: asyncio.StreamReader) -> bool:
    """The shard closed the connection and sent nothing."""
    return await asyncio.wait_for(reader.read(), timeout=10) == b""


async def test_a_connection_without_the_token_gets_no_turn(
    shards: list[Any], broker: EmbeddedBroker, topics: Topics
) -> None:
    owner = shards[shard_index("t1", len(shards))]
    host, port, token = await owner.endpoint.remote()
    context = f"forged-{uuid.uuid4().hex[:6]}"
    for hello in ("not-the-token", token[:-1], ""):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(_pack(0, "hello", hello) + _pack(1, "turn", ask(context, "let me in")))
        await writer.drain()
        assert await _closed_without_answer(reader)
        writer.close()
    # No hello at all: the turn frame itself is refused.
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(_pack(1, "turn", ask(context, "let me in")))
    assert await _closed_without_answer(reader)
    writer.close()
    # Nothing of it reached the log.
    logged = await KafkaStreamReader(broker.bootstrap_servers, topics.events).read_stream(context)
    assert logged == []


async def test_bad_frames_close_only_their_connection(shards: list[Any]) -> None:
    gateway = Gateway(shards, [], "socket")
    context = f"ctx-{uuid.uuid4().hex[:6]}"
    assert (await gateway.turn(ask(context, "before"))).status == "ok"
    owner = shards[shard_index("t1", len(shards))]
    host, port, token = await owner.endpoint.remote()
    garbage = b"\xc1\xff\x00not msgpack"
    bad_frames = [
        struct.pack(">I", len(garbage)) + garbage,  # not msgpack
        struct.pack(">I", MAX_FRAME + 1),  # longer than allowed
        _pack(1, "turn", {"meta": "not a request"}),  # msgpack, not a ChatRequest
        _pack(1, "drop_tables", None),  # no such operation
    ]
    for bad in bad_frames:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(_pack(0, "hello", token) + bad)
        assert await _closed_without_answer(reader), bad[:20]
        writer.close()
    # The shard and the gateway's own connection are unharmed.
    after = await gateway.turn(ask(context, "after"))
    assert after.status == "ok"
    assert "turn 2" in after.reply


async def test_an_abandoned_stream_is_cut_on_the_shard(
    slow_shards: list[Any], broker: EmbeddedBroker, topics: Topics
) -> None:
    gateway = Gateway(slow_shards, [], "socket")
    context = f"ctx-{uuid.uuid4().hex[:6]}"
    stream = gateway.stream(ask(context, "a question"))
    waiting = asyncio.create_task(anext(stream))
    await asyncio.sleep(0.5)
    waiting.cancel()  # the HTTP client went away while the model was thinking
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    await asyncio.sleep(3.0)  # the model (2.5 s) would have answered by now
    # The turn was cut on the shard: no reply is in the log.
    reader = KafkaStreamReader(broker.bootstrap_servers, topics.events)
    logged = await reader.read_stream(context)
    assert not [e for e in logged if e.type == "ReplyCompleted"]
    # The context goes on at the next version.
    nxt = await gateway.turn(ask(context, "again"))
    assert nxt.status == "ok"
    assert nxt.events[0].stream_version == len(logged) + 1
