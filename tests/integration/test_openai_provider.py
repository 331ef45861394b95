"""The OpenAI-compatible provider against a real OpenAI-compatible server (the benchmark's
mock upstream, on uvicorn in its own process): streamed and whole answers, and one kept-alive
connection for every turn (a response closed half read would cost a new connection each)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from actors.ports import ChatMessage
from actors.router import Deployment
from benchmarks.bench_gateway import _launch, _stop
from infra.adapters.kafka.broker import free_port
from infra.adapters.models import OpenAICompatibleModel

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    port = free_port()
    proc, base = _launch(
        [sys.executable, "-m", "benchmarks.mock_upstream", str(port)],
        port,
        {**os.environ, "PYTHONPATH": str(ROOT)},
        tmp_path_factory.mktemp("upstream"),
    )
    try:
        yield base, proc.pid
    finally:
        _stop(proc)


async def test_turns_reuse_one_connection_streamed_and_whole(upstream: tuple[str, int]) -> None:
    base, _ = upstream

    async def connections() -> int:
        """Connections the upstream has seen (this question opens one of its own)."""
        async with httpx.AsyncClient() as client:
            return int((await client.get(f"{base}/connections")).text)

    seen_before = await connections()
    model = OpenAICompatibleModel(
        Deployment(name="mock-a", model="mock", provider="openai", base_url=f"{base}/v1")
    )
    messages = [ChatMessage(role="user", content="hi")]
    try:
        for _ in range(5):
            pieces = [p async for p in model.stream(messages) if isinstance(p, str)]
            assert "".join(pieces).startswith("word0 word1") and len(pieces) == 20
            whole = await model.complete(messages)
            assert whole.content == "".join(pieces) and whole.completion_tokens == 20
        # Ten turns on one kept-alive connection: the model's one, and this question's.
        assert await connections() - seen_before == 1 + 1
    finally:
        await model.close()


async def test_a_stream_is_whole_at_its_finish_reason_even_without_done() -> None:
    """Some servers close the body after the chunk with finish_reason and send no [DONE]:
    that answer is whole. A body that closes before any finish_reason was cut."""
    import json

    from aiohttp import web

    from actors.ports import ModelError, StreamEnd

    def chunk(content: str, finish: str | None = None) -> bytes:
        body = {"choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}]}
        return f"data: {json.dumps(body)}\n\n".encode()

    async def sse(request: web.Request) -> web.StreamResponse:
        cut = (await request.json())["model"] == "cut"
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(chunk("Hello") + chunk(" there"))
        if not cut:
            await response.write(chunk("", "stop"))
        await response.write_eof()
        return response

    runner, port = await _upstream(sse)
    messages = [ChatMessage(role="user", content="hi")]
    try:
        for model, whole in (("whole", True), ("cut", False)):
            provider = OpenAICompatibleModel(
                Deployment(
                    name=model, model=model, provider="openai",
                    base_url=f"http://127.0.0.1:{port}/v1",
                )
            )  # fmt: skip
            try:
                if whole:
                    items = [p async for p in provider.stream(messages)]
                    assert items[:-1] == ["Hello", " there"]
                    assert isinstance(items[-1], StreamEnd) and items[-1].finish_reason == "stop"
                else:
                    with pytest.raises(ModelError, match="before its finish_reason"):
                        _ = [p async for p in provider.stream(messages)]
            finally:
                await provider.close()
    finally:
        await runner.cleanup()


async def test_tools_are_forwarded_and_streamed_tool_call_deltas_come_back_whole() -> None:
    """tools, tool_choice and response_format reach the upstream as sent; an assistant
    message's tool calls and a tool result go as OpenAI takes them; tool_calls streamed in
    fragments (id and name once, arguments in pieces) come back as one whole call, and the
    same from a whole answer."""
    import json

    from aiohttp import web

    from actors.chat import GenerationOptions
    from actors.ports import StreamEnd
    from events import ToolCall

    bodies: list[dict[str, object]] = []

    def chunk(delta: dict[str, object], finish: str | None = None) -> bytes:
        body = {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(body)}\n\n".encode()

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        bodies.append(body)
        call = {"index": 0, "id": "call_9", "type": "function", "function": {"name": "lookup"}}
        if not body["stream"]:
            whole = {**call, "function": {"name": "lookup", "arguments": '{"q": "x"}'}}
            message = {"role": "assistant", "content": None, "tool_calls": [whole]}
            return web.json_response(
                {"choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}],
                 "usage": {"prompt_tokens": 3, "completion_tokens": 4}}
            )  # fmt: skip
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(chunk({"role": "assistant", "tool_calls": [call]}))
        for part in ('{"q"', ': "x"}'):
            fragment = {"index": 0, "function": {"arguments": part}}
            await response.write(chunk({"tool_calls": [fragment]}))
        await response.write(chunk({}, "tool_calls") + b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    runner, port = await _upstream(handler)
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    options = GenerationOptions(
        tools=[tool], tool_choice="required", response_format={"type": "json_object"}
    )
    earlier = ToolCall(id="call_1", name="lookup", arguments="{}")
    messages = [
        ChatMessage(role="user", content="find x"),
        ChatMessage(role="assistant", content="", tool_calls=(earlier,)),
        ChatMessage(role="tool", content='{"found": 0}', tool_call_id="call_1"),
        ChatMessage(role="user", content="again"),
    ]
    provider = OpenAICompatibleModel(
        Deployment(name="t", model="t", provider="openai", base_url=f"http://127.0.0.1:{port}/v1")
    )
    try:
        items = [p async for p in provider.stream(messages, options)]
        end = items[-1]
        assert items[:-1] == [] and isinstance(end, StreamEnd)
        assert end.finish_reason == "tool_calls"
        assert end.tool_calls == (ToolCall(id="call_9", name="lookup", arguments='{"q": "x"}'),)
        whole = await provider.complete(messages, options)
        assert whole.finish_reason == "tool_calls" and whole.tool_calls == end.tool_calls
    finally:
        await provider.close()
        await runner.cleanup()
    sent = bodies[0]
    assert sent["tools"] == [tool] and sent["tool_choice"] == "required"
    assert sent["response_format"] == {"type": "json_object"}
    assert sent["messages"][1] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
        ],
    }
    assert sent["messages"][2] == {
        "role": "tool",
        "content": '{"found": 0}',
        "tool_call_id": "call_1",
    }


async def _upstream(handler: Any) -> tuple[Any, int]:
    """An OpenAI-compatible upstream in this process, answering chat completions with
    `handler`: its runner (clean it up) and its port."""
    from aiohttp import web

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port
