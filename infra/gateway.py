"""The front of the request path: sends a chat turn to the shard that owns the tenant."""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator
from typing import Any

from actors.chat import ChatRequest, Piece, TurnOutcome
from actors.context import ContextCommand, ContextView, RequestMeta
from actors.ports import ChatMessage


def shard_index(tenant_id: str, shards: int) -> int:
    """Which shard owns `tenant_id` (stable across restarts and processes)."""
    return zlib.crc32(tenant_id.encode()) % shards


class Gateway:
    """One actor round trip per chat turn."""

    def __init__(self, shards: list[Any], models: list[str]) -> None:
        if not shards:
            raise ValueError("the gateway needs at least one shard")
        self._shards = shards
        self.models = models

    def _shard(self, request: ChatRequest | ContextCommand) -> Any:
        return self._owner(request.meta)

    def _owner(self, meta: RequestMeta) -> Any:
        return self._shards[shard_index(meta.tenant_id, len(self._shards))]

    async def command(self, command: ContextCommand) -> ContextView:
        result: ContextView = await self._shard(command).command.remote(command)
        return result

    async def conversation(self, meta: RequestMeta) -> list[ChatMessage]:
        messages: list[ChatMessage] = await self._owner(meta).conversation.remote(meta)
        return messages

    async def view(self, meta: RequestMeta) -> ContextView:
        result: ContextView = await self._owner(meta).view.remote(meta)
        return result

    async def forget(self, tenant_id: str, user_id: str) -> int:
        """Erase a user's content from what the tenant's shard holds in memory."""
        dropped: int = await self._shards[shard_index(tenant_id, len(self._shards))].forget.remote(
            tenant_id, user_id
        )
        return dropped

    async def turn(self, request: ChatRequest) -> TurnOutcome:
        outcome: TurnOutcome = await self._shard(request).turn.remote(request)
        return outcome

    async def stream(self, request: ChatRequest) -> AsyncIterator[str | Piece | TurnOutcome]:
        generator = (
            self._shard(request).stream_turn.options(num_returns="streaming").remote(request)
        )
        async for ref in generator:  # the shard sends what was ready at once, as a batch
            for item in await ref:
                yield item
