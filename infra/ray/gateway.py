"""The front of the request path: sends a chat turn to the shard that owns the tenant."""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from actors.chat import ChatRequest, Piece, TurnOutcome
from actors.context import ContextCommand, ContextView, RequestMeta
from actors.ports import ChatMessage
from infra.ray.shardlink import ShardLink


def shard_index(tenant_id: str, shards: int) -> int:
    """Which shard owns `tenant_id` (stable across restarts and processes)."""
    return zlib.crc32(tenant_id.encode()) % shards


def _endpoint_of(shard: Any) -> Callable[[], Awaitable[tuple[str, int, str]]]:
    async def endpoint() -> tuple[str, int, str]:
        where: tuple[str, int, str] = await shard.endpoint.remote()
        return where

    return endpoint


class Gateway:
    """One hop per chat turn: over the shard's direct connection (`socket`, the default),
    or as an actor call (`ray`). Everything else a shard does is an actor call."""

    def __init__(self, shards: list[Any], models: list[str], transport: str = "socket") -> None:
        if not shards:
            raise ValueError("the gateway needs at least one shard")
        self._shards = shards
        self.models = models
        self._links = (
            [ShardLink(_endpoint_of(shard)) for shard in shards] if transport == "socket" else None
        )

    def close(self) -> None:
        """Close the direct connections (they open again on the next turn)."""
        for link in self._links or ():
            link.close()

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

    def _link(self, request: ChatRequest) -> ShardLink | None:
        if self._links is None:
            return None
        return self._links[shard_index(request.meta.tenant_id, len(self._shards))]

    async def turn(self, request: ChatRequest) -> TurnOutcome:
        link = self._link(request)
        if link is not None:
            return await link.turn(request)
        outcome: TurnOutcome = await self._shard(request).turn.remote(request)
        return outcome

    async def stream(self, request: ChatRequest) -> AsyncIterator[str | Piece | TurnOutcome]:
        link = self._link(request)
        if link is not None:
            async for item in link.stream(request):
                yield item
            return
        generator = (
            self._shard(request).stream_turn.options(num_returns="streaming").remote(request)
        )
        async for ref in generator:  # the shard sends what was ready at once, as a batch
            for item in await ref:
                yield item
