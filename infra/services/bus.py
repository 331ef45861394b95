"""The event bus for Python users and plugins, on the event log itself.

    bus = EventBus(bootstrap_servers, name="billing")        # a durable subscriber
    bus.on("ReplyCompleted", count_tokens, priority=10)
    bus.on("Reply*", audit, filter=lambda e: e.tenant_id == "acme")
    async with bus.running():
        await bus.emit(FeedbackGiven(...), tenant_id="acme", user_id="bob")  # into the log

`emit` appends to the log (acks=all) like every other event; it is not a side channel.
Handlers run in the subscriber's own loop with error isolation (a failing handler is
logged and kept in `failures`, the others still run). The subscriber's position is its
consumer group's: a subscriber that was away receives what it missed, from its last
position, when it runs again under the same name. `history()` reads the log from its
beginning.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
from collections import deque
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any

from events import DecodeError, Envelope, Event, decode, topics
from events.standalone import standalone
from infra.adapters.clock import SystemClock
from infra.adapters.kafka.clients import KafkaEventSink
from infra.config import BrokerConfig
from infra.services.rebuild import BrokerSource
from streams.bus import Dispatcher, Filter, Handler, HandlerFailure, Subscription
from streams.loop import BatchLoop, LoopHealth, LoopSettings

log = logging.getLogger(__name__)


class EventBus:
    """Delivers the log's events to in-process subscribers by type (plugins, workflows), as a
    durable consumer group. Long as a class: subscribe, run, deliver and health share the
    consumer's state."""

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        name: str,
        topic: str = topics.EVENTS,
        broker: BrokerConfig | None = None,
        start_at_end: bool = False,
    ) -> None:
        """`name` is the durable subscriber (its position survives restarts)."""
        if not name:
            raise ValueError("a bus subscriber needs a name (its position is kept under it)")
        self.name = name
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self.dispatcher = Dispatcher()
        self.failures: deque[HandlerFailure] = deque(maxlen=1000)
        self.delivered = 0
        self.undecodable = 0
        self._sink = KafkaEventSink(bootstrap_servers, topic, broker or BrokerConfig())
        self._clock = SystemClock()
        self._task: asyncio.Task[None] | None = None
        self._loop = BatchLoop(
            LoopSettings(
                bootstrap_servers=bootstrap_servers,
                topic=topic,
                group=f"chatllm-bus-{name}",
                batch_size=500,
                batch_within_s=0.1,
                session_timeout_s=6.0,
                heartbeat_interval_s=1.0,
                rebalance_timeout_s=3.0,
                commit_interval_s=0.5,
                start_at_end=start_at_end,
            ),
            self._handle,
        )

    def on(
        self, pattern: str, handler: Handler, *, priority: int = 0, filter: Filter | None = None
    ) -> Subscription:
        """Call `handler` for events whose type matches `pattern` (exact or glob)."""
        return self.dispatcher.on(pattern, handler, priority=priority, filter=filter)

    def off(self, subscription: Subscription) -> None:
        self.dispatcher.off(subscription)

    async def emit(
        self,
        event: Event | Envelope[Any],
        *,
        tenant_id: str = "",
        user_id: str = "",
        stream: str = "bus",
    ) -> Envelope[Any]:
        """Append an event to the log; returns once the broker acknowledged it. A payload is
        wrapped as the only event of a stream of its own (`<stream>:<event id>`); a whole
        envelope is appended as it is."""
        if isinstance(event, Envelope):
            envelope = event
        else:
            if not tenant_id:
                raise ValueError("emit needs the tenant the event belongs to")
            envelope = standalone(
                event,
                event_id=self._clock.new_event_id(),
                tenant_id=tenant_id,
                user_id=user_id or f"bus:{self.name}",
                occurred_at=datetime.now(UTC),
                stream=stream,
            )
        await self._sink.append([envelope])
        return envelope

    async def _handle(self, records: Sequence[Any]) -> None:
        for record in records:
            try:
                event = decode(record.value or b"")
            except DecodeError:
                self.undecodable += 1
                continue
            failures = await self.dispatcher.dispatch(event)
            self.delivered += 1
            for failure in failures:
                log.warning(
                    "bus %s: handler %s failed on %s %s: %s",
                    self.name,
                    failure.handler,
                    failure.event_type,
                    failure.event_id,
                    failure.error,
                )
            self.failures.extend(failures)

    @property
    def is_running(self) -> bool:
        return self._task is not None

    @property
    def health(self) -> LoopHealth:
        """The subscriber's consume loop: lag, and whether it is stuck (for /healthz)."""
        return self._loop.health

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[EventBus]:
        """Deliver events to the handlers for the duration of the block."""
        task = self._task = asyncio.create_task(self._loop.run())
        try:
            yield self
        finally:
            self._task = None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await self.close()

    async def close(self) -> None:
        """Stop the producer `emit` uses (running() does it on its way out)."""
        await self._sink.stop()

    async def history(
        self,
        pattern: str = "*",
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int | None = None,
    ) -> list[Envelope[Any]]:
        """The log's events whose type matches `pattern`, from its beginning."""
        source = BrokerSource(self.bootstrap_servers, self.topic)

        def read() -> list[Envelope[Any]]:
            found: list[Envelope[Any]] = []
            for page in source.pages(since, until):
                for body in page:
                    try:
                        event = decode(body.encode())
                    except DecodeError:
                        continue
                    if not fnmatch.fnmatchcase(event.type, pattern):
                        continue
                    if since is not None and event.occurred_at < since:
                        continue
                    if until is not None and event.occurred_at >= until:
                        continue
                    found.append(event)
            found.sort(key=lambda e: (e.occurred_at, e.event_id))
            return found[:limit] if limit is not None else found

        return await asyncio.to_thread(read)
