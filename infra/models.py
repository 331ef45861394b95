"""Model providers. The demo model is offline and deterministic: the same conversation
always gets the same reply, so tests, demos and replays are repeatable."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence

from actors.ports import ChatMessage, Completion

_OPENERS = (
    "Here is a short answer",
    "Thinking about it briefly",
    "In a few words",
    "As far as the demo model can tell",
)


def count_tokens(text: str) -> int:
    """A cheap token estimate (whitespace words); real providers report their own counts."""
    return len(text.split())


class DemoModel:
    """An offline model: a deterministic reply derived from the conversation."""

    def __init__(self, name: str = "demo-1", latency_ms: float = 0.0) -> None:
        self.name = name
        self._latency_s = latency_ms / 1000

    async def complete(self, messages: Sequence[ChatMessage]) -> Completion:
        if self._latency_s:
            await asyncio.sleep(self._latency_s)
        last = next((m.content for m in reversed(messages) if m.role == "user"), "")
        digest = hashlib.sha256("\x1f".join(m.content for m in messages).encode()).digest()
        opener = _OPENERS[digest[0] % len(_OPENERS)]
        topic = " ".join(last.split()[:8]) or "(nothing)"
        turn = sum(1 for m in messages if m.role == "user")
        content = f"{opener} (turn {turn}): you said \u201c{topic}\u201d."
        return Completion(
            content=content,
            model=self.name,
            prompt_tokens=sum(count_tokens(m.content) for m in messages),
            completion_tokens=count_tokens(content),
        )
