"""Hosts conversation contexts inside a Ray actor.

A context is a plain ContextActor; a ContextHost keeps many of them in one Ray
worker process (one process per context would not scale), and every context maps
to exactly one host, so each stream has a single writer. A context the host has
not seen is rebuilt from its stream in the log before its first command.
"""

from __future__ import annotations

import asyncio
import logging

from actors.context import ChatTurn, ContextActor, SendMessage
from infra.clock import SystemClock
from infra.config import Settings
from infra.kafka import KafkaEventSink, KafkaStreamReader
from infra.models import DemoModel

log = logging.getLogger(__name__)


class ContextHost:
    """A shard of contexts; made remote with ray.remote in the composition root."""

    def __init__(self, settings: Settings, bootstrap_servers: str) -> None:
        topic = settings.topics.events
        self._sink = KafkaEventSink(bootstrap_servers, topic, settings.broker)
        self._reader = KafkaStreamReader(
            bootstrap_servers, topic, timeout_s=settings.broker.delivery_timeout_ms / 1000
        )
        self._model = DemoModel(latency_ms=settings.model.demo_latency_ms)
        self._clock = SystemClock()
        self._contexts: dict[str, ContextActor] = {}
        self._loading: dict[str, asyncio.Lock] = {}

    async def ready(self) -> int:
        """Connect to the broker; returns the number of contexts held."""
        await self._sink.start()
        return len(self._contexts)

    async def send_message(self, command: SendMessage) -> ChatTurn:
        actor = await self._actor(command.context_id)
        try:
            return await actor.send_message(command)
        finally:
            if actor.broken:
                # Its last append may be partly in the log: rebuild it on the next command.
                self._contexts.pop(command.context_id, None)

    async def _actor(self, context_id: str) -> ContextActor:
        actor = self._contexts.get(context_id)
        if actor is not None:
            return actor
        lock = self._loading.setdefault(context_id, asyncio.Lock())
        async with lock:
            actor = self._contexts.get(context_id)
            if actor is None:
                history = await self._reader.read_stream(context_id)
                actor = ContextActor(
                    context_id,
                    sink=self._sink,
                    model=self._model,
                    clock=self._clock,
                    history=history,
                )
                self._contexts[context_id] = actor
                if history:
                    log.info("rebuilt context %s from %d events", context_id, len(history))
        self._loading.pop(context_id, None)
        return actor

    async def shutdown(self) -> None:
        await self._sink.stop()
