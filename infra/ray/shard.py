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
import contextlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import msgspec

from actors.cache import ReplyCache
from actors.chat import ChatRequest, ChatService, Piece, TurnOutcome
from actors.context import (
    ContextActor,
    ContextCommand,
    ContextRejected,
    ContextState,
    ContextView,
    RequestMeta,
    decide_command,
    view,
)
from actors.limiter import RateLimiter
from actors.ports import ChatMessage
from actors.router import ModelRouter
from actors.sanitizer import Sanitizer
from events import Envelope, FeedbackGiven, UserForgotten, topics
from events.chain import payload_digest
from events.erasure import erase
from infra import gcpolicy
from infra.adapters.clock import SystemClock
from infra.adapters.embeddings import MiniLMEmbedder
from infra.adapters.kafka.clients import KafkaEventSink, KafkaStreamReader
from infra.adapters.models import DemoModel, provider_for
from infra.adapters.sentiment import VaderScorer
from infra.adapters.tracing import hex_ids, remote_parent, setup_tracing, shutdown_tracing, tracer
from infra.config import Settings
from infra.ray.gateway import shard_index
from infra.ray.lease import Lease, LeasedSink
from infra.ray.shardlink import ShardServer
from streams.projections import topic_of

log = logging.getLogger(__name__)


STREAM_BATCH = 64
"""Most pieces in one batch from the shard to the API process."""


class _Failed:
    """The turn's stream raised: the error, carried to where the stream is read."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class ReplayClock:
    """Wall-clock time, or a recorded event's time while the limiter replays the log."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self) -> float:
        return time.time() if self.at is None else self.at


# A restarted shard replays the limit decisions of this long ago and since (the widest
# window `limits` offers is a day; longer ones would need a longer replay).
LIMITER_MEMORY_S = 86_400.0


def _with_topic(state: ContextState, command: ContextCommand) -> ContextCommand:
    """Feedback with the topic of the question its reply answered (for the quality
    projection per model and topic)."""
    assert command.feedback is not None
    question = ""
    for message in state.messages:
        if message.message_id == command.feedback.message_id:
            break
        if message.role == "user":
            question = message.content
    feedback = msgspec.structs.replace(command.feedback, topic=topic_of(question))
    return msgspec.structs.replace(command, feedback=feedback)


def reply_cache(settings: Settings) -> ReplyCache | None:
    """The shard's reply cache, when configured (the model loads on the first lookup)."""
    c = settings.cache
    if not c.enabled:
        return None
    embedder: Any = MiniLMEmbedder() if c.semantic else ExactOnly()
    return ReplyCache(embedder, threshold=c.threshold, ttl_s=c.ttl_s, max_entries=c.max_entries)


class ExactOnly:
    """The embedder of an exact-only cache: no model, every vector the same (so only the
    exact match can hit; the threshold is never reached by a different text)."""

    name = "exact"
    dimension = 1

    def embed(self, texts: Any) -> Any:
        import numpy as np

        return np.zeros((len(texts), 1), dtype=np.float32)


class ChatShard:
    """Made remote with ray.remote in the composition root; plain and testable without Ray.
    Long as a class: one short method per remote call (a turn, a command, a view, the
    lease, the cache, forgetting), each delegating to the actors it holds."""

    def __init__(
        self,
        settings: Settings,
        bootstrap_servers: str,
        index: int = 0,
        count: int = 1,
        leases: Any = None,
    ) -> None:
        """`leases`: the LeaseRegistry actor handle; None runs without write fencing (a shard
        that is certainly alone, as in a single-process test)."""
        self._index, self._count = index, count
        setup_tracing(
            settings.tracing.otlp_endpoint, "chatllm-shard", settings.tracing.export_delay_ms
        )
        self._limiter_clock = ReplayClock()
        self._restored = False
        self._restoring = asyncio.Lock()
        topic = settings.topics.events
        self._kafka = KafkaEventSink(bootstrap_servers, topic, settings.broker)
        self._lease: Lease | None = None
        self._sink: Any = self._kafka
        if leases is not None:
            self._lease = Lease(
                index,
                settings.ray.lease_ttl_s,
                acquire=lambda i, holder: leases.acquire.remote(i, holder),
                renew=lambda i, epoch: leases.renew.remote(i, epoch),
                release=lambda i, epoch: leases.release.remote(i, epoch),
            )
            self._sink = LeasedSink(self._kafka, self._lease)
        self._reader = KafkaStreamReader(
            bootstrap_servers, topic, timeout_s=settings.broker.delivery_timeout_ms / 1000
        )
        self._clock = SystemClock()
        router = ModelRouter(settings.routing, settings.deployments)
        self.service = ChatService(
            limiter=RateLimiter(settings.limits, self._limiter_clock),
            router=router,
            providers={
                d.name: provider_for(d, settings.model.demo_latency_ms)
                for d in settings.deployments
            },
            fallback=DemoModel(name="demo-fallback"),
            sanitizer=Sanitizer(settings.sanitizer),
            sentiment=VaderScorer(),
            clock=self._clock,
            cache=reply_cache(settings),
        )
        # Least recently used first; an evicted context is rebuilt from the log when it returns.
        self._contexts: OrderedDict[str, ContextActor] = OrderedDict()
        self._capacity = settings.ray.contexts_per_shard
        self._max_document_bytes = settings.contexts.max_document_bytes
        self._loading: dict[str, asyncio.Lock] = {}
        self._reserved = (*settings.ingest.stream_prefixes, *topics.SYSTEM_STREAM_PREFIXES)
        self._forgotten: dict[str, dict[str, datetime]] = {}
        """Per tenant, the users whose content was erased (UserForgotten), and when: what
        they wrote before then is erased, what they write afterwards is not."""
        self._link = ShardServer(self.turn, self.stream_turn)
        self._local = not settings.ray.address

    def reconfigure(self, settings: Settings) -> None:
        """Apply the live part of a new configuration (`chatllm config use`): limits keep
        their windows; a new routing table or deployments start with closed breakers."""
        service = self.service
        service.limiter.use(settings.limits)
        service.sanitizer = Sanitizer(settings.sanitizer)
        if (
            settings.routing != service.router.policy
            or list(service.router.deployments.values()) != settings.deployments
        ):
            learned = service.router.bandit.counts  # what feedback taught stays
            service.router = ModelRouter(settings.routing, settings.deployments)
            service.router.bandit.counts = learned
            service.providers = {
                d.name: provider_for(d, settings.model.demo_latency_ms)
                for d in settings.deployments
            }

    def pid(self) -> int:
        """The actor's process id (the memory detector samples it)."""
        return os.getpid()

    async def ready(self) -> int:
        """Connect, take the write lease, restore the limits; returns the contexts held."""
        await self._prepare()
        gcpolicy.settle()
        return len(self._contexts)

    async def endpoint(self) -> tuple[str, int, str]:
        """Where this shard takes turns directly (host, port) and the token a connection
        shows first; the API processes ask for it through Ray, again after a restart."""
        await self._prepare()
        host = "127.0.0.1"
        if not self._local:  # a cluster: the API processes may be on other nodes
            import ray

            host = ray.util.get_node_ip_address()
        where, port = await self._link.start(host)
        return where, port, self._link.token

    async def _prepare(self) -> None:
        """Once per incarnation (Ray re-runs __init__ on restart, not ready()); then free."""
        if self._restored:
            return
        await self._kafka.start()
        if self._lease is not None:
            await self._lease.hold()
        await self._restore_limits()

    async def _restore_limits(self) -> None:
        """Replay this shard's recorded limit decisions, so a restart does not reset the
        windows (an actor that forgot its counts would let a user past the limit), and its
        feedback, so routing keeps what it learned."""
        if self._restored:
            return
        async with self._restoring:
            if self._restored:
                return
            since = time.time() - LIMITER_MEMORY_S
            events = await self._reader.read_types(
                {"RateLimitChecked", "RateAdjusted", "FeedbackGiven", "UserForgotten"}
            )
            for event in events:  # whom to erase, whatever its age
                if isinstance(event.payload, UserForgotten):
                    self._forget_before(event.tenant_id, event.payload.user_id, event.occurred_at)
            mine = sorted(
                (
                    e
                    for e in events
                    if shard_index(e.tenant_id, self._count) == self._index
                    and e.occurred_at.timestamp() >= since
                    and not isinstance(e.payload, UserForgotten)
                ),
                key=lambda e: e.occurred_at,
            )
            try:
                for event in mine:
                    if isinstance(event.payload, FeedbackGiven):
                        self.service.router.bandit.learn(event.tenant_id, event.payload)
                        continue
                    self._limiter_clock.at = event.occurred_at.timestamp()
                    self.service.limiter.replay(event.payload, event.tenant_id, event.user_id)
            finally:
                self._limiter_clock.at = None
            self._restored = True
            if mine:
                log.info("shard %d restored its limits from %d decisions", self._index, len(mine))

    def _span(self, name: str, meta: RequestMeta) -> tuple[Any, RequestMeta]:
        """A span for the request, child of the caller's; the request's events will carry it
        (when tracing is off the span is a no-op and the events carry the turn's span id,
        which the API process chose)."""
        parent = remote_parent(meta.trace_id, meta.span_id or self._clock.new_span_id())
        span = tracer().start_span(
            name,
            context=parent,
            attributes={"chatllm.tenant": meta.tenant_id, "chatllm.context": meta.context_id},
        )
        if not span.is_recording():
            return span, meta if meta.span_id else msgspec.structs.replace(
                meta, span_id=self._clock.new_span_id()
            )
        return span, msgspec.structs.replace(meta, span_id=hex_ids(span)[1])

    @staticmethod
    def _describe(span: Any, outcome: TurnOutcome) -> None:
        span.set_attribute("chatllm.status", outcome.status)
        span.set_attribute("chatllm.model", outcome.model)
        span.set_attribute("chatllm.deployment", outcome.deployment)
        span.set_attribute("chatllm.fallback", outcome.fallback)
        if outcome.error_class:
            span.set_attribute("chatllm.error_class", outcome.error_class)

    async def turn(self, request: ChatRequest) -> TurnOutcome:
        await self._prepare()
        span, meta = self._span("chat.turn", request.meta)
        request = msgspec.structs.replace(request, meta=meta)
        context = await self._context(meta.context_id, request.new_context)
        try:
            outcome = await self.service.turn(context, request)
            self._describe(span, outcome)
            return outcome
        except BaseException as exc:
            span.record_exception(exc)
            raise
        finally:
            span.end()
            self._drop_if_broken(context)

    async def stream_turn(
        self, request: ChatRequest
    ) -> AsyncIterator[list[str | Piece | TurnOutcome]]:
        """The turn as a Ray streaming generator of batches: text pieces, then the outcome.
        Each batch is whatever the model produced while the last one crossed to the API
        process (every Ray item costs a round trip): the first piece goes alone, at once,
        and a slow model's pieces go one by one, as they come."""
        await self._prepare()
        span, meta = self._span("chat.turn", request.meta)
        request = msgspec.structs.replace(request, meta=meta)
        context = await self._context(meta.context_id, request.new_context)
        produced: asyncio.Queue[Any] = asyncio.Queue()
        end = object()

        async def pump() -> None:
            try:
                async for item in self.service.stream(context, request):
                    produced.put_nowait(item)
            except BaseException as exc:  # handed to the reader, raised there
                produced.put_nowait(_Failed(exc))
                if isinstance(exc, asyncio.CancelledError):
                    raise
            finally:
                produced.put_nowait(end)

        task = asyncio.create_task(pump())
        try:
            while True:
                batch = [await produced.get()]
                while not produced.empty() and len(batch) < STREAM_BATCH:
                    batch.append(produced.get_nowait())
                done = batch[-1] is end
                items = [i for i in batch if i is not end]
                for item in items:
                    if isinstance(item, _Failed):
                        raise item.error
                    if isinstance(item, TurnOutcome):
                        self._describe(span, item)
                if items:
                    yield items
                if done:
                    return
        finally:
            if not task.done():  # the reader went away: the turn is cut (nothing recorded)
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            span.end()
            self._drop_if_broken(context)

    async def command(self, command: ContextCommand) -> ContextView:
        """Attach or remove a document, set tags or overrides; returns the new view."""
        await self._prepare()
        span, meta = self._span("chat.context_command", command.meta)
        command = msgspec.structs.replace(command, meta=meta)
        context = await self._context(command.meta.context_id)
        try:
            context.admit(command.meta)
            async with context.lock:
                if command.feedback is not None:
                    command = _with_topic(context.state, command)
                decided = decide_command(
                    context.state,
                    command,
                    max_document_bytes=self._max_document_bytes,
                    document_id=self._clock.new_event_id(),
                )
                if decided:
                    await context.record(decided, command.meta)
                for event in decided:
                    if isinstance(event, FeedbackGiven):  # routing learns from it at once
                        self.service.router.bandit.learn(command.meta.tenant_id, event)
            return view(context.state)
        finally:
            span.end()
            self._drop_if_broken(context)

    async def view(self, meta: RequestMeta) -> ContextView:
        """The context's state as the caller may see it."""
        context = await self._context(meta.context_id)
        context.admit(meta)
        return view(context.state)

    async def conversation(self, meta: RequestMeta) -> list[ChatMessage]:
        """The context's messages (user and assistant), for a transcript."""
        context = await self._context(meta.context_id)
        context.admit(meta)
        return list(context.state.messages)

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
        reserved = next((p for p in self._reserved if context_id.startswith(p)), None)
        if reserved is not None:
            # One writer per stream: upstream (ingest) and chat-llm's own streams are not
            # chat contexts, and a chat turn must never write into them.
            raise ContextRejected(
                f"context id {context_id!r} starts with {reserved!r}, which is reserved for"
                " upstream and system streams; choose another id"
            )
        if new:  # a fresh id minted by the gateway: nothing to read back from the log
            context = ContextActor(context_id, sink=self._sink, clock=self._clock)
            self._keep(context)
            return context
        lock = self._loading.setdefault(context_id, asyncio.Lock())
        async with lock:
            context = self._contexts.get(context_id)
            if context is None:
                read = await self._reader.read_chain(context_id)
                history, digests = self._erased(read)
                context = ContextActor(
                    context_id, sink=self._sink, clock=self._clock, history=history,
                    digests=digests,
                )  # fmt: skip
                self._keep(context)
                if history:
                    log.info("rebuilt context %s from %d events", context_id, len(history))
        self._loading.pop(context_id, None)
        return context

    def _erased(
        self, read: list[tuple[Envelope[Any], str | None]]
    ) -> tuple[list[Envelope[Any]], dict[str, str]]:
        """The stream as the archive holds it: the content of users who were forgotten is
        erased (the log still has it until its retention), each erased event with its
        original payload's digest, which its place in the audit chain is made of."""
        history, digests = [], {}
        for event, digest in read:
            forgotten_at = self._forgotten.get(event.tenant_id, {}).get(event.user_id)
            if digest is None and forgotten_at is not None and event.occurred_at <= forgotten_at:
                erased = erase(event.payload)
                if erased != event.payload:
                    digest = payload_digest(event)
                    event = msgspec.structs.replace(event, payload=erased)
            if digest is not None:
                digests[event.event_id] = digest
            history.append(event)
        return history, digests

    def _forget_before(self, tenant_id: str, user_id: str, at: datetime) -> None:
        users = self._forgotten.setdefault(tenant_id, {})
        users[user_id] = max(at, users.get(user_id, at))

    def forget(self, tenant_id: str, user_id: str) -> int:
        """Erase a user's content from what this shard holds: the contexts it has in memory
        are read again (erased) on their next use, and the reply cache starts empty.
        Returns how many contexts were let go."""
        self._forget_before(tenant_id, user_id, datetime.now(UTC))
        dropped = 0
        for context_id, context in list(self._contexts.items()):
            if context.state.tenant_id != tenant_id:
                continue
            dropped += 1
            if context.lock.locked():
                context.broken = True  # mid-turn: dropped (and read again) when it ends
            else:
                del self._contexts[context_id]
        if self.service.cache is not None:
            self.service.cache.clear()
        return dropped

    async def shutdown(self) -> None:
        await self._link.stop()
        if self._lease is not None:
            await self._lease.release()
        await self._kafka.stop()
        shutdown_tracing()
