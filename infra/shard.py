"""A chat shard: the Ray actor that owns a set of tenants.

Everything a turn needs that must be exact lives here, in one process: the tenant's
conversation contexts (ContextActor, one per context), its rate limiter and the
model router with its circuit breakers. A tenant maps to exactly one shard, so its
limits are exact across every HTTP replica, each context has a single writer, and
a chat turn costs one actor round trip. A context the shard has not seen yet is
rebuilt from its stream in the log before its first turn.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator

from actors.chat import ChatRequest, ChatService, TurnOutcome
from actors.context import ContextActor
from actors.limiter import RateLimiter
from actors.router import ModelRouter
from actors.sanitizer import Sanitizer
from infra.clock import SystemClock
from infra.config import Settings
from infra.kafka import KafkaEventSink, KafkaStreamReader
from infra.models import DemoModel, provider_for
from infra.sentiment import VaderScorer

log = logging.getLogger(__name__)


class ChatShard:
    """Made remote with ray.remote in the composition root; plain and testable without Ray."""

    def __init__(self, settings: Settings, bootstrap_servers: str) -> None:
        topic = settings.topics.events
        self._sink = KafkaEventSink(bootstrap_servers, topic, settings.broker)
        self._reader = KafkaStreamReader(
            bootstrap_servers, topic, timeout_s=settings.broker.delivery_timeout_ms / 1000
        )
        self._clock = SystemClock()
        router = ModelRouter(settings.routing, settings.deployments)
        self.service = ChatService(
            limiter=RateLimiter(settings.limits, time.time),
            router=router,
            providers={d.name: provider_for(d) for d in settings.deployments},
            fallback=DemoModel(name="demo-fallback"),
            sanitizer=Sanitizer(settings.sanitizer),
            sentiment=VaderScorer(),
            clock=self._clock,
        )
        # Least recently used first; an evicted context is rebuilt from the log when it returns.
        self._contexts: OrderedDict[str, ContextActor] = OrderedDict()
        self._capacity = settings.ray.contexts_per_shard
        self._loading: dict[str, asyncio.Lock] = {}

    async def ready(self) -> int:
        """Connect to the broker; returns the number of contexts held."""
        await self._sink.start()
        return len(self._contexts)

    async def turn(self, request: ChatRequest) -> TurnOutcome:
        context = await self._context(request.meta.context_id, request.new_context)
        try:
            return await self.service.turn(context, request)
        finally:
            self._drop_if_broken(context)

    async def stream_turn(self, request: ChatRequest) -> AsyncIterator[str | TurnOutcome]:
        """The turn as a Ray streaming generator: text pieces, then the outcome."""
        context = await self._context(request.meta.context_id, request.new_context)
        try:
            async for item in self.service.stream(context, request):
                yield item
        finally:
            self._drop_if_broken(context)

    def _drop_if_broken(self, context: ContextActor) -> None:
        if context.broken:
            # Its last append may be partly in the log: rebuild it on the next request.
            self._contexts.pop(context.state.context_id, None)

    def _keep(self, context: ContextActor) -> None:
        self._contexts[context.state.context_id] = context
        self._contexts.move_to_end(context.state.context_id)
        while len(self._contexts) > self._capacity:
            oldest_id, oldest = next(iter(self._contexts.items()))
            if oldest.lock.locked():  # mid-turn: keep it, evict later
                break
            del self._contexts[oldest_id]

    async def _context(self, context_id: str, new: bool = False) -> ContextActor:
        context = self._contexts.get(context_id)
        if context is not None:
            self._contexts.move_to_end(context_id)
            return context
        if new:  # a fresh id minted by the gateway: nothing to read back from the log
            context = ContextActor(context_id, sink=self._sink, clock=self._clock)
            self._keep(context)
            return context
        lock = self._loading.setdefault(context_id, asyncio.Lock())
        async with lock:
            context = self._contexts.get(context_id)
            if context is None:
                history = await self._reader.read_stream(context_id)
                context = ContextActor(
                    context_id, sink=self._sink, clock=self._clock, history=history
                )
                self._keep(context)
                if history:
                    log.info("rebuilt context %s from %d events", context_id, len(history))
        self._loading.pop(context_id, None)
        return context

    async def shutdown(self) -> None:
        await self._sink.stop()
