"""The OpenAI-compatible provider against a real OpenAI-compatible server (the benchmark's
mock upstream, on uvicorn in its own process): streamed and whole answers, and one kept-alive
connection for every turn (a response closed half read would cost a new connection each)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from actors.ports import ChatMessage
from actors.router import Deployment
from benchmarks.bench_gateway import _launch, _stop
from infra.broker import free_port
from infra.models import OpenAICompatibleModel

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
            pieces = [p async for p in model.stream(messages)]
            assert "".join(pieces).startswith("word0 word1") and len(pieces) == 20
            whole = await model.complete(messages)
            assert whole.content == "".join(pieces) and whole.completion_tokens == 20
        # Ten turns on one kept-alive connection: the model's one, and this question's.
        assert await connections() - seen_before == 1 + 1
    finally:
        await model.close()
