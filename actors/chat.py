"""One chat turn, end to end inside the shard that owns the context: input check,
rate limit, routing, model calls with retries, breakers and fallbacks, and the reply.

Every decision is an event, and the whole turn is appended to the log in one batch
(one broker acknowledgement), after the model has answered: a turn is in the log
completely or not at all, and the request path waits for the broker once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import msgspec

from actors.cache import ReplyCache, scope_key
from actors.calls import (
    FALLBACK_NOTE,
    GenerationOptions,
    ModelCalls,
    TextBound,
    _Attempt,
    count_tokens,
)
from actors.context import ContextActor, RequestMeta
from actors.knowledge import Retrieved, knowledge_prompt
from actors.limiter import RateLimiter
from actors.ports import ChatMessage, ModelProvider, SentimentScorer
from actors.router import ModelRouter
from actors.sanitizer import Sanitizer, Verdict
from events import (
    CacheHit,
    ContextCreated,
    Envelope,
    Event,
    InputChecked,
    KnowledgeUsed,
    MessageReceived,
    PassageRef,
    RateLimitChecked,
    ReplyCompleted,
    ReplyFailed,
    RouteDecided,
    SentimentScored,
    ToolCall,
)

CACHE_DEPLOYMENT = "cache"
"""The deployment of a reply the reply cache gave (a CacheHit event says which one)."""


class ChatRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A chat request: the new message last; for a new stateless context, its history first."""

    meta: RequestMeta
    messages: tuple[ChatMessage, ...]
    model: str = ""
    """A model the caller asks for (OpenAI's `model`); empty or unknown lets the router choose."""
    title: str = ""
    new_context: bool = False
    """The gateway minted this context id just now (a UUIDv7): there is no stream to read back."""
    fanout: tuple[str, ...] = ()
    """Ask these models at once (each with its own fallbacks) instead of routing to one."""
    merge: Literal["first", "all"] = "first"
    """Fan-out: keep the first complete answer (the others are cancelled), or all side by side."""
    knowledge: tuple[Retrieved, ...] = ()
    """Knowledge-base passages to put before the model (retrieval-augmented reply)."""
    use_cache: bool = True
    """Let the reply cache answer (when the shard has one)."""
    options: GenerationOptions = GenerationOptions()


class Piece(msgspec.Struct, frozen=True, array_like=True):
    """A piece of the answer of fan-out member `index` (single-model turns yield plain str)."""

    index: int
    text: str


class Choice(msgspec.Struct, frozen=True, kw_only=True):
    """One fan-out member's answer (or one of n choices)."""

    model: str
    content: str = ""
    fallback: bool = False
    error_class: str = ""
    finish_reason: str = "stop"


class EventRef(msgspec.Struct, frozen=True):
    """Which event a turn wrote (the events themselves are on the log)."""

    event_id: str
    type: str
    stream_version: int


def refs(events: Sequence[Envelope[Any]]) -> tuple[EventRef, ...]:
    return tuple(EventRef(e.event_id, e.type, e.stream_version) for e in events)


class TurnOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """What the caller gets once the turn's events are acknowledged by the log."""

    status: Literal["ok", "failed", "denied", "blocked"]
    context_id: str
    finish_reason: str = "stop"
    """"length" when the reply was cut at max_tokens, else "stop"."""
    reply: str = ""
    model: str = ""
    deployment: str = ""
    fallback: bool = False
    error_class: str = ""
    detail: str = ""
    retry_after_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    events: tuple[EventRef, ...] = ()
    """The events the turn wrote; kept small, since outcomes cross the actor boundary."""
    choices: tuple[Choice, ...] = ()
    """Fan-out with merge "all": every member's answer, in the order asked."""
    message_id: str = ""
    """The reply's message id (what feedback refers to)."""
    tool_calls: tuple[ToolCall, ...] = ()
    """The function calls the model asked for (finish_reason "tool_calls")."""
    logprobs: list[dict[str, Any]] | None = None
    """The answer's token log probabilities as the provider gave them (OpenAI's
    logprobs.content), when asked for; not recorded in the events."""


def sentiment_label(score: float) -> Literal["positive", "neutral", "negative"]:
    # VADER's conventional thresholds on the compound score.
    if score >= 0.05:
        return "positive"
    if score <= -0.05:
        return "negative"
    return "neutral"


@dataclass
class _Turn:
    """One turn as its stages pass it on: what was asked, the context as it was, the
    events so far, and the conversation the model will see."""

    context: ContextActor
    request: ChatRequest
    state: Any
    message_id: str
    begun: datetime
    verdict: Verdict
    payloads: list[Event]
    conversation: list[ChatMessage] = field(default_factory=list)
    scope: str = ""
    """The reply cache's scope ("" when the cache may not answer this turn)."""
    vector: Any = None

    @property
    def depth(self) -> int:
        """How many user messages came before this one."""
        return sum(1 for m in self.conversation if m.role == "user") - 1


@dataclass
class _Recorded:
    """One answer's end: its final event, where it came from, the turn's events as the log
    acknowledged them, and the calls' state."""

    final: ReplyCompleted | ReplyFailed
    deployment: str
    events: Sequence[Envelope[Any]]
    attempt: _Attempt


class ChatService(ModelCalls):
    """The turn workflow of one shard; collaborators arrive through __init__. Long as a class:
    its methods are the turn's stages in the order stream() calls them, none over 70 lines;
    the model calls are ModelCalls'."""

    def __init__(
        self,
        *,
        limiter: RateLimiter,
        router: ModelRouter,
        providers: Mapping[str, ModelProvider],
        fallback: ModelProvider,
        sanitizer: Sanitizer,
        sentiment: SentimentScorer,
        clock: Any,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        cache: ReplyCache | None = None,
    ) -> None:
        self.limiter = limiter
        self.router = router
        self.providers = providers
        self.fallback = fallback
        self.sanitizer = sanitizer
        self.sentiment = sentiment
        self.clock = clock
        self.sleep = sleep
        self.cache = cache

    async def turn(self, context: ContextActor, request: ChatRequest) -> TurnOutcome:
        """The whole turn; the reply comes back complete."""
        outcome: TurnOutcome | None = None
        # Nothing reaches the caller before the end: a model cut off mid-answer can be
        # retried or fall back like any other failure.
        async for item in self.stream(context, request, live=False):
            if isinstance(item, TurnOutcome):
                outcome = item
        assert outcome is not None
        return outcome

    async def stream(
        self, context: ContextActor, request: ChatRequest, live: bool = True
    ) -> AsyncIterator[str | Piece | TurnOutcome]:
        """The turn, yielding reply text as the model produces it, and the outcome last.
        Its stages: the input check and the rate limit (_admit), what the message brings to
        the context (_receive), the reply cache (_from_cache), the route, then the models
        (_fan_out_turn for fan-out and n choices, _call_turn for one answer)."""
        context.admit(request.meta)
        if not request.messages or request.messages[-1].role not in ("user", "tool"):
            raise ValueError("the last message of a request must be the user's or a tool's")
        async with context.lock:
            turn = await self._admit(context, request)
            if isinstance(turn, TurnOutcome):
                yield turn
                return
            self._receive(turn)
            cached = False
            async for item in self._from_cache(turn):
                cached = True
                yield item
            if cached:
                return
            route = self.router.route(
                in_reply_to=turn.message_id,
                text=turn.verdict.text,
                depth=turn.depth,
                current_model=turn.state.model,
                requested=request.model or turn.state.config.get("model", ""),
                tenant_id=request.meta.tenant_id,
                needs=request.options.needs(),
            )
            if len(request.fanout) > 1 or (request.options.n or 1) > 1:
                async for member_item in self._fan_out_turn(turn, route):
                    yield member_item
                return
            recorded: _Recorded | None = None
            async for piece in self._call_turn(turn, route, live):
                if isinstance(piece, _Recorded):
                    recorded = piece
                else:
                    yield piece
        assert recorded is not None
        yield self._outcome(turn, recorded)

    async def _admit(self, context: ContextActor, request: ChatRequest) -> _Turn | TurnOutcome:
        """The input check and the rate limit: the turn goes on, or its refusal (recorded)."""
        meta = request.meta
        begun = self.clock.now()  # when what precedes the model calls happened
        message_id = self.clock.new_event_id()
        text = request.messages[-1].content
        verdict = self.sanitizer.check(text)
        checked = InputChecked(
            message_id=message_id,
            verdict="allow" if verdict.allowed else "block",
            reasons=verdict.reasons,
            length=len(text),
            policy_version=self.sanitizer.policy.version,
        )
        if not verdict.allowed:
            events = await context.record([checked], meta)
            return TurnOutcome(
                status="blocked",
                context_id=meta.context_id,
                error_class="input_rejected",
                detail="; ".join(verdict.reasons),
                events=refs(events),
            )
        decision = self.limiter.check(meta.tenant_id, meta.user_id)
        if not decision.allowed:
            events = await context.record([checked, decision], meta)
            return TurnOutcome(
                status="denied",
                context_id=meta.context_id,
                error_class="rate_limited",
                detail=f"rate limit {decision.limit} reached",
                retry_after_s=decision.retry_after_s,
                events=refs(events),
            )
        return _Turn(
            context=context,
            request=request,
            state=context.state,
            message_id=message_id,
            begun=begun,
            verdict=verdict,
            payloads=[checked, decision],
        )

    def _receive(self, turn: _Turn) -> None:
        """What the message brings: a new context's start (and a stateless request's
        history), the message itself with its sentiment, the knowledge passages; and the
        conversation the model will see."""
        request, state, message_id = turn.request, turn.state, turn.message_id
        new_message, text = request.messages[-1], turn.verdict.text
        start: list[Event] = []
        if state.version == 0:
            start.append(ContextCreated(title=request.title))
            # A stateless request brings its history along: it becomes the context's start.
            for i, old in enumerate(request.messages[:-1]):
                start.append(
                    MessageReceived(
                        message_id=f"{message_id}-h{i}",
                        content=old.content,
                        role=old.role,  # type: ignore[arg-type]
                        tokens=count_tokens(old.content),
                        tool_calls=old.tool_calls,
                        tool_call_id=old.tool_call_id,
                    )
                )
        score = max(-1.0, min(1.0, self.sentiment.score(text)))
        turn.payloads[:0] = start
        turn.payloads += [
            MessageReceived(
                message_id=message_id,
                content=text,
                tokens=count_tokens(text),
                role="tool" if new_message.role == "tool" else "user",
                tool_call_id=new_message.tool_call_id,
            ),
            SentimentScored(
                message_id=message_id,
                label=sentiment_label(score),
                score=round(score, 4),
                scorer=self.sentiment.name,
            ),
        ]
        turn.conversation = [
            *state.prompt(),
            *(m for m in request.messages[:-1] if state.version == 0),
            ChatMessage(
                role=new_message.role,
                content=text,
                message_id=message_id,
                tool_call_id=new_message.tool_call_id,
            ),
        ]
        if request.knowledge:
            turn.conversation.insert(
                len(turn.conversation) - 1,
                ChatMessage(role="system", content=knowledge_prompt(request.knowledge)),
            )
            turn.payloads.append(
                KnowledgeUsed(
                    in_reply_to=message_id,
                    passages=tuple(
                        PassageRef(
                            source=p.source,
                            document=p.document,
                            chunk=p.chunk,
                            score=round(p.score, 4),
                        )
                        for p in request.knowledge
                    ),
                )
            )

    async def _from_cache(self, turn: _Turn) -> AsyncIterator[str | TurnOutcome]:
        """The reply cache's answer, recorded, when it has one (the text, then the outcome);
        nothing when it has none. Sets the turn's cache scope and vector either way, so a
        model's answer can be put in the cache afterwards."""
        request, meta, options = turn.request, turn.request.meta, turn.request.options
        bounded = (
            options.max_tokens is not None
            or options.stop
            or options.response_format
            or options.tools
        )
        cacheable = request.use_cache and not bounded and len(request.fanout) <= 1
        if self.cache is None or not cacheable:
            return
        started = time.perf_counter()
        text, conversation = turn.verdict.text, turn.conversation
        turn.scope = scope_key(
            meta.tenant_id, conversation[:-1], request.model or turn.state.config.get("model", "")
        )
        # The embedding runs outside the loop (onnxruntime lets go of the GIL).
        turn.vector = await asyncio.to_thread(self.cache.vector, text)
        hit = self.cache.lookup(turn.scope, text, turn.vector, self.clock.monotonic())
        if hit is None:
            return
        reply = ReplyCompleted(
            message_id=self.clock.new_event_id(),
            in_reply_to=turn.message_id,
            content=hit.entry.reply,
            model=hit.entry.model,
            latency_ms=(time.perf_counter() - started) * 1000,
            prompt_tokens=sum(count_tokens(m.content) for m in conversation),
            completion_tokens=count_tokens(hit.entry.reply),
            deployment=CACHE_DEPLOYMENT,
        )
        turn.payloads += [
            CacheHit(
                in_reply_to=turn.message_id,
                kind=hit.kind,
                similarity=hit.similarity,
                cached_message_id=hit.entry.message_id,
                cached_prompt=hit.entry.prompt[:500],
                embedder=self.cache.embedder.name,
            ),
            reply,
        ]
        events = await turn.context.record(turn.payloads, meta, cause_after=turn.message_id)
        yield reply.content
        yield TurnOutcome(
            status="ok",
            context_id=meta.context_id,
            reply=reply.content,
            model=reply.model,
            deployment=CACHE_DEPLOYMENT,
            prompt_tokens=reply.prompt_tokens,
            completion_tokens=reply.completion_tokens,
            events=refs(events),
            message_id=reply.message_id,
        )

    async def _fan_out_turn(
        self, turn: _Turn, route: RouteDecided
    ) -> AsyncIterator[Piece | TurnOutcome]:
        """Fan-out (several models at once) or n choices (n calls down one route): every
        member's pieces as they come, then the recorded outcome."""
        request, options = turn.request, turn.request.options
        n = options.n or 1
        merge = request.merge
        member_options = [options]
        if n > 1:
            # n choices: n calls down the same route, side by side, each a member.
            routes = [route] * n
            turn.payloads.append(route)
            merge = "all"
            member_options = [msgspec.structs.replace(options, n=None, choice=i) for i in range(n)]
        else:
            routes = [
                self.router.route(
                    in_reply_to=turn.message_id,
                    text=turn.verdict.text,
                    depth=turn.depth,
                    requested=model,
                    needs=options.needs(),
                )
                for model in request.fanout
            ]
            turn.payloads += routes
        at = {id(p): turn.begun for p in turn.payloads}
        members: list[tuple[str, ReplyCompleted | ReplyFailed | None, _Attempt]] = []
        async for item in self._fan_out(routes, turn.conversation, merge, member_options):
            if isinstance(item, Piece):
                yield item
            else:
                members = item
        for _, _, member_attempt in members:
            turn.payloads += member_attempt.events
            at |= member_attempt.at
        turn.payloads += self.router.take_circuit_events()
        turn.payloads += [f for _, f, _ in members if f is not None]
        meta = request.meta
        events = await turn.context.record(turn.payloads, meta, cause_after=turn.message_id, at=at)
        yield self._fan_out_outcome(meta, members, turn.conversation, events, merge)

    async def _call_turn(
        self, turn: _Turn, route: RouteDecided, live: bool
    ) -> AsyncIterator[str | _Recorded]:
        """One answer down the route's chain: its pieces, then what was recorded (the turn's
        events, acknowledged by the log; the answer put in the cache when it may be)."""
        turn.payloads.append(route)
        attempt = _Attempt(live, turn.request.options)
        # Each event carries when it happened: the audit trail shows the waits between
        # a turn's attempts (the reply and what follows it: when it is recorded).
        attempt.at.update((id(p), turn.begun) for p in turn.payloads)
        final: ReplyCompleted | ReplyFailed | None = None
        deployment_used = ""
        try:
            async for piece in self._call_chain(route, turn.conversation, attempt):
                if isinstance(piece, tuple):
                    deployment_used, final = piece
                else:
                    yield piece
        finally:
            turn.payloads += attempt.events
        assert final is not None
        turn.payloads += self.router.take_circuit_events()
        turn.payloads.append(final)
        events = await turn.context.record(
            turn.payloads, turn.request.meta, cause_after=turn.message_id, at=attempt.at
        )
        if turn.scope and isinstance(final, ReplyCompleted) and not final.fallback:
            assert self.cache is not None
            self.cache.put(
                turn.scope,
                turn.verdict.text,
                final.content,
                final.model,
                final.message_id,
                turn.vector,
                self.clock.monotonic(),
            )
        yield _Recorded(final=final, deployment=deployment_used, events=events, attempt=attempt)

    def _outcome(self, turn: _Turn, recorded: _Recorded) -> TurnOutcome:
        """What the caller gets of one answer, once its events are acknowledged."""
        final, meta, events = recorded.final, turn.request.meta, recorded.events
        if isinstance(final, ReplyFailed):
            return TurnOutcome(
                status="failed",
                context_id=meta.context_id,
                error_class=final.error_class,
                detail=final.message,
                model=final.model,
                prompt_tokens=sum(count_tokens(m.content) for m in turn.conversation),
                events=refs(events),
            )
        usage = recorded.attempt.usage
        return TurnOutcome(
            status="ok",
            context_id=meta.context_id,
            reply=final.content,
            model=final.model,
            deployment=recorded.deployment,
            fallback=final.fallback,
            prompt_tokens=final.prompt_tokens,
            completion_tokens=final.completion_tokens,
            events=refs(events),
            message_id=final.message_id,
            finish_reason=final.finish_reason,
            tool_calls=final.tool_calls,
            logprobs=usage.logprobs if usage else None,
        )

    async def _fan_out(
        self,
        routes: Sequence[RouteDecided],
        conversation: Sequence[ChatMessage],
        merge: str,
        options: Sequence[GenerationOptions] = (),
    ) -> AsyncIterator[Piece | list[tuple[str, ReplyCompleted | ReplyFailed | None, _Attempt]]]:
        """Run every route at once; yields pieces as they come ("all") or the winner's answer
        ("first"), then each member's (deployment, final event or None if cancelled, attempt).
        `options`: every member's, or one for all."""
        queue: asyncio.Queue[Piece | tuple[int, str, ReplyCompleted | ReplyFailed | None]] = (
            asyncio.Queue()
        )
        attempts = [
            _Attempt(options=options[i] if len(options) > 1 else next(iter(options), None))
            for i in range(len(routes))
        ]

        async def member(index: int, route: RouteDecided) -> None:
            deployment, final = "", None
            try:
                async for piece in self._call_chain(route, conversation, attempts[index]):
                    if isinstance(piece, tuple):
                        deployment, final = piece
                    elif merge == "all":
                        queue.put_nowait(Piece(index, piece))
            finally:
                queue.put_nowait((index, deployment, final))

        tasks = [asyncio.create_task(member(i, r)) for i, r in enumerate(routes)]
        finished: dict[int, tuple[str, ReplyCompleted | ReplyFailed | None]] = {}
        try:
            while len(finished) < len(tasks):
                item = await queue.get()
                if isinstance(item, Piece):
                    yield item
                    continue
                index, deployment, final = item
                finished[index] = (deployment, final)
                if merge == "first" and isinstance(final, ReplyCompleted):
                    yield Piece(0, final.content)
                    break
        finally:
            for task in tasks:
                if not task.done():
                    task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        yield [(*finished.get(i, ("", None)), attempts[i]) for i in range(len(routes))]

    def _fan_out_outcome(
        self,
        meta: RequestMeta,
        members: Sequence[tuple[str, ReplyCompleted | ReplyFailed | None, _Attempt]],
        conversation: Sequence[ChatMessage],
        events: Sequence[Envelope[Any]],
        merge: str,
    ) -> TurnOutcome:
        prompt_tokens = sum(count_tokens(m.content) for m in conversation)
        answers = [(d, f) for d, f, _ in members if isinstance(f, ReplyCompleted)]
        if not answers:
            failed = next((f for _, f, _ in members if isinstance(f, ReplyFailed)), None)
            return TurnOutcome(
                status="failed",
                context_id=meta.context_id,
                error_class=failed.error_class if failed else "network",
                detail=failed.message if failed else "no fan-out member answered",
                prompt_tokens=prompt_tokens,
                events=refs(events),
            )
        deployment, first = answers[0]
        choices = tuple(
            Choice(
                model=f.model, content=f.content, fallback=f.fallback, finish_reason=f.finish_reason
            )
            if isinstance(f, ReplyCompleted)
            else Choice(model=f.model if f else "", error_class=f.error_class if f else "cancelled")
            for _, f, _ in members
        )
        return TurnOutcome(
            status="ok",
            context_id=meta.context_id,
            reply=first.content,
            model=first.model,
            deployment=deployment,
            fallback=first.fallback,
            prompt_tokens=prompt_tokens,
            completion_tokens=sum(f.completion_tokens for _, f in answers),
            events=refs(events),
            choices=choices if merge == "all" else (),
            message_id=first.message_id,
        )


__all__ = [
    "FALLBACK_NOTE",
    "ChatRequest",
    "ChatService",
    "Choice",
    "GenerationOptions",
    "Piece",
    "RateLimitChecked",
    "TextBound",
    "TurnOutcome",
    "count_tokens",
]
