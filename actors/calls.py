"""The model calls of a turn: each model of the route's chain with its retry rule (tenacity),
its deployment's circuit breaker (pybreaker), the fallbacks after it, a cut stream carried
on by the next model, and what the caller asked of the generation (max_tokens and stop are
enforced here for every provider). ChatService (actors/chat.py) runs a turn's stages and
inherits these calls."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, Literal

import msgspec
import pybreaker
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
)

from actors.limiter import RateLimiter
from actors.ports import ChatMessage, ModelError, ModelProvider, StreamEnd
from actors.router import REQUEST_ERRORS, Deployment, ModelRouter, RetryRule
from events import (
    Event,
    ModelCalled,
    ReplyCompleted,
    ReplyFailed,
    RouteDecided,
)

FALLBACK_NOTE = "[fallback: every routed model failed; this answer is from the offline demo model] "


class GenerationOptions(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What the caller asked of the generation (OpenAI's parameters). `max_tokens` and `stop`
    are enforced by the service for every provider; all are carried to a provider that
    takes them (an OpenAI-compatible upstream); the offline demo model has nothing to
    sample, so the sampling ones do not change its answer."""

    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    user: str | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    response_format: dict[str, Any] | None = None
    """OpenAI's response_format: {"type": "json_object"} or {"type": "json_schema", ...}."""
    tools: list[dict[str, Any]] | None = None
    """OpenAI's tools: the functions the model may call."""
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    n: int | None = None
    """OpenAI's n: this many independent answers (choices), each its own model call."""
    choice: int = 0
    """Which of the n choices a call is for (the demo model varies its answer by it)."""
    logprobs: bool | None = None
    top_logprobs: int | None = None
    extra: dict[str, Any] | None = None
    """Parameters beyond OpenAI's, for an upstream that documents them (Deployment.extra_params)."""

    def needs(self) -> frozenset[str]:
        """The deployment capabilities these options use (actors.router.CAPABILITIES)."""
        needs = set()
        if self.response_format and self.response_format.get("type", "text") != "text":
            needs.add("json_mode")
        if self.tools:
            needs.add("tools")
        if (self.n or 1) > 1:
            needs.add("n")
        if self.logprobs:
            needs.add("logprobs")
        return frozenset(needs)


def count_tokens(text: str) -> int:
    """A cheap token estimate (whitespace words); enough for limits and usage reports."""
    return len(text.split())


class TextBound:
    """Cuts a reply as it streams: at `max_tokens` (counted as count_tokens counts), or just
    before the first `stop` sequence (held back until it cannot be one). `finish` says why
    it was cut ("length" or "stop"); after that, nothing more passes."""

    def __init__(self, max_tokens: int | None, stop: Sequence[str]) -> None:
        self.max_tokens = max_tokens
        self.stop = tuple(s for s in stop if s)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.pending = ""
        self.out = ""
        self.finish: str | None = None

    def feed(self, piece: str) -> str:
        """What of `piece` may go out now."""
        if self.finish is not None:
            return ""
        self.pending += piece
        cuts = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if cuts:
            text, self.pending = self.pending[: min(cuts)], ""
            passed = self._words(text)
            if self.finish is None:
                self.finish = "stop"
            return passed
        keep = min(self.hold, len(self.pending))
        text = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        return self._words(text)

    def close(self) -> str:
        """The end of the answer: what was held back (it was no stop sequence)."""
        if self.finish is not None:
            return ""
        text, self.pending = self.pending, ""
        return self._words(text)

    def _words(self, text: str) -> str:
        if self.max_tokens is None or not text:
            self.out += text
            return text
        whole = self.out + text
        if count_tokens(whole) <= self.max_tokens:
            self.out = whole
            return text
        import re

        ends = [m.end() for m in re.finditer(r"\S+", whole)]
        cut = ends[self.max_tokens - 1] if self.max_tokens > 0 else 0
        passed = whole[len(self.out) : max(cut, len(self.out))]
        self.out += passed
        self.finish, self.pending = "length", ""
        return passed


class _Attempt:
    """The state of the model calls of one turn: events so far, streamed text so far."""

    def __init__(self, live: bool = True, options: GenerationOptions | None = None) -> None:
        self.events: list[Event] = []
        self.at: dict[int, datetime] = {}
        """When events of the turn happened, by id (those not here: when recorded)."""
        self.text: list[str] = []
        self.options = options or GenerationOptions()
        self.finish = "stop"
        """Why the answer ended: "length" when max_tokens cut it, else "stop"."""
        self.live = live
        """Text reaches the caller as it comes (a stream); otherwise only the whole reply."""
        self.streamed = False
        """Text of this turn already reached the caller: no retry into a different answer."""
        self.continued = False
        """A fallback continued a cut answer (its usage covers only its part)."""
        self.resume: Literal["prefill", "restart"] = "prefill"
        """How a model carries on a stream the caller has begun to read: given the text so
        far as an assistant prefill, or asked again from the start, its answer passed on
        only after it has repeated that text exactly."""
        self.usage: StreamEnd | None = None
        """What the last call's provider said of its answer (finish_reason, usage)."""
        self.bound: TextBound | None = None
        self.needs: frozenset[str] = self.options.needs()
        """The capabilities the request uses (a deployment must serve them all)."""


class ModelCalls:
    """The calls of one turn's models; ChatService provides `router`, `providers`,
    `fallback`, `limiter`, `clock` and `sleep`. One class of small steps (the longest,
    _one_call, is one call with its breaker, its bound and its event)."""

    router: ModelRouter
    providers: Mapping[str, ModelProvider]
    fallback: ModelProvider
    limiter: RateLimiter
    clock: Any
    sleep: Callable[[float], Awaitable[None]]

    async def _call_chain(
        self, route: RouteDecided, conversation: Sequence[ChatMessage], attempt: _Attempt
    ) -> AsyncIterator[str | tuple[str, ReplyCompleted | ReplyFailed]]:
        """Try the route's models in order; yields text, and (deployment, final event) last.

        A stream cut after text reached the caller goes on where it stopped, and the caller
        receives only the continuation, so it reads one answer: the next model of the chain
        gets the text so far as an assistant prefill if it takes one; if it does not (or
        refuses the prefill with a 400), it is asked again from the start and its answer is
        passed on only once it has repeated the text already sent, exactly. When no model
        manages, the turn fails with the error that cut the stream (never a truncated answer
        presented as whole, never the prefill's 400). After context_too_long, only models
        with a larger context window are asked."""
        last_error: ModelError | None = None
        cut: ModelError | None = None
        """The error that cut a stream the caller had begun to read: the turn's real error."""
        last_model = route.chain[0] if route.chain else ""
        too_long_at = -1
        """The context window of the model that found the prompt too long (-1: none did)."""
        policy = self.router.policy
        for model in route.chain:
            if too_long_at >= 0 and too_long_at and self.router.window(model) <= too_long_at:
                continue  # it would not take the prompt either
            last_model = model
            if attempt.streamed:
                prefills = self.router.serves(model, attempt.needs | {"prefill"})
                attempt.resume = "prefill" if prefills else "restart"
            try:
                async for piece in self._resumed(model, conversation, attempt, route.in_reply_to):
                    if isinstance(piece, tuple):
                        deployment, latency_ms = piece
                        text = "".join(attempt.text)
                        usage = attempt.usage if not attempt.continued else None
                        yield (
                            deployment,
                            ReplyCompleted(
                                message_id=self.clock.new_event_id(),
                                in_reply_to=route.in_reply_to,
                                content=text,
                                model=model,
                                latency_ms=latency_ms,
                                prompt_tokens=(
                                    usage.prompt_tokens
                                    if usage is not None and usage.prompt_tokens is not None
                                    else sum(count_tokens(m.content) for m in conversation)
                                ),
                                completion_tokens=(
                                    usage.completion_tokens
                                    if usage is not None
                                    and usage.completion_tokens is not None
                                    and attempt.finish != "length"
                                    else count_tokens(text)
                                ),
                                deployment=deployment,
                                finish_reason=attempt.finish,
                                tool_calls=attempt.usage.tool_calls if attempt.usage else (),
                                # Answered by a fallback of the chain, not the routed model.
                                fallback=model != route.chain[0],
                            ),
                        )
                        return
                    yield piece
            except ModelError as exc:
                last_error = exc
                if attempt.streamed:
                    cut = cut or exc
                    if exc.error_class == "content_policy":
                        break
                    continue  # the next model of the chain carries on
                if exc.error_class == "context_too_long":
                    too_long_at = self.router.window(model)
                if self._rule(exc.error_class).then == "fail":
                    break
        if cut is not None:
            last_error = ModelError(
                cut.error_class,
                f"{cut.message} (after {len(''.join(attempt.text))} characters had been "
                "sent, no fallback continued the answer"
                + (f": {last_error.message}" if last_error is not cut and last_error else "")
                + ")",
            )
        if last_error is None:
            last_error = ModelError(
                "network", f"no model of the chain {list(route.chain)} serves this request"
            )
        if (
            policy.demo_fallback
            and not attempt.streamed
            and self._rule(last_error.error_class).then != "fail"
        ):
            started = time.perf_counter()
            text = FALLBACK_NOTE
            yield FALLBACK_NOTE
            async for demo_piece in self.fallback.stream(conversation):
                if isinstance(demo_piece, str):
                    text += demo_piece
                    yield demo_piece
            yield (
                self.fallback.name,
                ReplyCompleted(
                    message_id=self.clock.new_event_id(),
                    in_reply_to=route.in_reply_to,
                    content=text,
                    model=self.fallback.name,
                    latency_ms=(time.perf_counter() - started) * 1000,
                    prompt_tokens=sum(count_tokens(m.content) for m in conversation),
                    completion_tokens=count_tokens(text),
                    deployment=self.fallback.name,
                    fallback=True,
                ),
            )
            return
        yield (
            "",
            ReplyFailed(
                in_reply_to=route.in_reply_to,
                error_class=last_error.error_class,
                message=last_error.message,
                model=last_model,  # the last model asked, not the chain's last
            ),
        )

    def _rule(self, error_class: str) -> RetryRule:
        return self.router.policy.retries.get(error_class, RetryRule())

    def _wait(self, state: RetryCallState) -> float:
        policy = self.router.policy
        error = state.outcome.exception() if state.outcome else None
        if (
            isinstance(error, ModelError)
            and error.error_class == "rate_limited"
            and error.retry_after_s
        ):
            return min(error.retry_after_s, policy.retry_after_cap_s)
        # Exponential with equal jitter: never less than half the step (a retry that comes
        # back at once only hammers a provider that just failed), never more than the cap.
        step = min(policy.backoff_max_s, policy.backoff_base_s * 2 ** (state.attempt_number - 1))
        return step / 2 + random.uniform(0, step / 2)

    def _stop(self, state: RetryCallState) -> bool:
        error = state.outcome.exception() if state.outcome else None
        if not isinstance(error, ModelError):
            return True
        if (
            error.error_class == "rate_limited"
            and error.retry_after_s > self.router.policy.retry_after_cap_s
        ):
            return True  # waiting that long is worse than falling back
        return state.attempt_number >= self._rule(error.error_class).attempts

    async def _resumed(
        self, model: str, conversation: Sequence[ChatMessage], attempt: _Attempt, in_reply_to: str
    ) -> AsyncIterator[str | tuple[str, float]]:
        """_call_model; for a stream the caller has begun to read, a model that refuses the
        assistant prefill (a 400) is asked again from the start."""
        try:
            async for piece in self._call_model(model, conversation, attempt, in_reply_to):
                yield piece
        except ModelError as exc:
            refused = exc.error_class == "bad_request" and attempt.resume == "prefill"
            if not (attempt.streamed and refused):
                raise
            attempt.resume = "restart"
            async for piece in self._call_model(model, conversation, attempt, in_reply_to):
                yield piece

    async def _call_model(
        self, model: str, conversation: Sequence[ChatMessage], attempt: _Attempt, in_reply_to: str
    ) -> AsyncIterator[str | tuple[str, float]]:
        """One model with its retry rule; yields text, and (deployment, latency_ms) on success."""
        retrying = AsyncRetrying(
            retry=retry_if_exception(lambda e: isinstance(e, ModelError) and not attempt.streamed),
            stop=self._stop,
            wait=self._wait,
            sleep=self.sleep,
            reraise=True,
        )
        number = 0
        async for try_ in retrying:
            with try_:
                number += 1
                prefilled = attempt.streamed and attempt.resume == "prefill"
                needs = attempt.needs | ({"prefill"} if prefilled else set())
                deployment = self.router.pick(model, needs)
                if deployment is None:
                    raise ModelError("network", f"model {model!r} has no deployment")
                async for piece in self._one_call(
                    deployment, conversation, attempt, in_reply_to, number
                ):
                    yield piece

    async def _one_call(
        self,
        deployment: Deployment,
        conversation: Sequence[ChatMessage],
        attempt: _Attempt,
        in_reply_to: str,
        number: int,
    ) -> AsyncIterator[str | tuple[str, float]]:
        provider = self.providers[deployment.name]
        breaker = self.router.breakers[deployment.name]
        started = time.perf_counter()
        outcome, detail, retry_after = "ok", "", 0.0
        sent = "".join(attempt.text) if attempt.streamed else ""
        prefill = sent if attempt.resume == "prefill" else ""
        skip: str | None = sent if sent and not prefill else None
        """A restart's answer must repeat this (what the caller has) before it is passed on."""
        held = ""
        if prefill:
            # The caller has read `prefill`: this model is asked to continue it.
            conversation = [*conversation, ChatMessage(role="assistant", content=prefill)]
        if sent:
            attempt.continued = True
        try:
            if not attempt.streamed:
                attempt.text.clear()  # a failed try's partial text is no part of the answer
            attempt.usage = None
            try:
                options = attempt.options
                if not sent or attempt.bound is None:
                    attempt.bound = TextBound(options.max_tokens, options.stop)
                bound = attempt.bound
                with breaker.calling():
                    if attempt.live:
                        async with contextlib.aclosing(
                            provider.stream(conversation, options=options)
                        ) as pieces:
                            async for piece in pieces:
                                if not isinstance(piece, str):
                                    attempt.usage = piece
                                    continue
                                if skip is not None:  # a restart: it must repeat `skip` first
                                    held += piece
                                    if not (skip.startswith(held) or held.startswith(skip)):
                                        raise ModelError(
                                            "malformed_response",
                                            "its answer from the start differs from the text "
                                            "already sent",
                                        )
                                    if len(held) < len(skip):
                                        continue
                                    piece, skip = held[len(skip) :], None
                                    if not piece:
                                        continue
                                text = bound.feed(piece)
                                if text:
                                    attempt.streamed = True
                                    attempt.text.append(text)
                                    yield text
                                if bound.finish is not None:
                                    break  # cut: the rest is not asked for
                        if skip is not None:
                            raise ModelError(
                                "malformed_response",
                                "its answer from the start is shorter than the text already sent",
                            )
                        tail = bound.close()
                        if tail:
                            attempt.streamed = True
                            attempt.text.append(tail)
                            yield tail
                    else:  # nobody reads pieces: one whole answer costs the upstream less
                        completion = await provider.complete(conversation, options=options)
                        attempt.usage = StreamEnd(
                            finish_reason=completion.finish_reason,
                            prompt_tokens=completion.prompt_tokens or None,
                            completion_tokens=completion.completion_tokens or None,
                            tool_calls=completion.tool_calls,
                            logprobs=completion.logprobs,
                        )
                        text = bound.feed(completion.content) + bound.close()
                        if text:
                            attempt.text.append(text)
                            yield text
                if bound.finish == "length":
                    attempt.finish = "length"
                elif attempt.usage is not None and attempt.usage.finish_reason:
                    attempt.finish = attempt.usage.finish_reason
                else:
                    attempt.finish = "stop"
                if prefill:
                    detail = f"continued a cut answer from its first {len(sent)} characters"
                elif sent:
                    detail = (
                        f"restarted a cut answer; its first {len(sent)} characters repeated "
                        "the text already sent, the rest was passed on"
                    )
            except pybreaker.CircuitBreakerError as exc:
                cause = exc.__context__
                if isinstance(cause, ModelError):
                    raise cause from None  # the failure that tripped the breaker
                raise ModelError("circuit_open", f"circuit of {deployment.name} is open") from None
        except ModelError as exc:
            outcome, detail, retry_after = exc.error_class, exc.message, exc.retry_after_s
            raise
        except (asyncio.CancelledError, GeneratorExit):
            outcome, detail = "cancelled", "another fan-out member answered first"
            raise
        finally:
            latency_ms = (time.perf_counter() - started) * 1000
            attempt.events.append(
                ModelCalled(
                    in_reply_to=in_reply_to,
                    model=deployment.model,
                    deployment=deployment.name,
                    attempt=number,
                    outcome=outcome,
                    latency_ms=round(latency_ms, 3),
                    detail=detail[:500],
                    retry_after_s=retry_after,
                )
            )
            # A breaker that changed state on this call says so right after it, in order.
            attempt.events.extend(self.router.take_circuit_events())
            if outcome not in REQUEST_ERRORS and outcome not in ("circuit_open", "cancelled"):
                adjusted = self.limiter.observe_upstream(
                    outcome, latency_ms, deployment.name, tuple(self.router.deployments)
                )
                if adjusted is not None:
                    attempt.events.append(adjusted)
            ended = self.clock.now()
            attempt.at.update((id(e), ended) for e in attempt.events if id(e) not in attempt.at)
        yield (deployment.name, latency_ms)
