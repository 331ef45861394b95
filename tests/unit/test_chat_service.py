"""The turn workflow with the in-memory log and the demo model: every decision is an event,
and each error class is retried, circuit-broken and fallen back as configured."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest

from actors.chat import FALLBACK_NOTE, ChatRequest, ChatService, GenerationOptions, TurnOutcome
from actors.context import ContextActor, RequestMeta
from actors.limiter import LimitPolicy, RateLimiter
from actors.ports import ChatMessage, Completion
from actors.router import Band, Deployment, ModelRouter, RetryRule, RoutingPolicy
from actors.sanitizer import Sanitizer, SanitizerPolicy
from infra.adapters.inmemory import InMemoryLog
from infra.adapters.models import DemoModel, provider_for
from infra.adapters.sentiment import VaderScorer
from tests.factories import FakeClock

POLICY = RoutingPolicy(
    bands=(Band(name="all", max_complexity=1.0, model="primary"),),
    fallbacks={"primary": ["backup"]},
    breaker_fail_max=3,
    breaker_reset_s=60,
)


class Harness:
    def __init__(
        self,
        deployments: Sequence[Deployment],
        policy: RoutingPolicy = POLICY,
        limits: LimitPolicy | None = None,
        sanitizer: SanitizerPolicy | None = None,
    ) -> None:
        self.log = InMemoryLog()
        self.appends = 0
        self.sleeps: list[float] = []
        self.clock = FakeClock()
        original = self.log.append

        async def counting_append(events: Any) -> None:
            self.appends += 1
            await original(events)

        self.log.append = counting_append  # type: ignore[method-assign]

        async def sleep(seconds: float) -> None:
            self.sleeps.append(seconds)

        self.service = ChatService(
            limiter=RateLimiter(limits or LimitPolicy(rate_per_s=0), lambda: 1000.0),
            router=ModelRouter(policy, deployments),
            providers={d.name: provider_for(d) for d in deployments},
            fallback=DemoModel(name="demo-fallback"),
            sanitizer=Sanitizer(sanitizer or SanitizerPolicy()),
            sentiment=VaderScorer(),
            clock=self.clock,
            sleep=sleep,
        )
        self.contexts: dict[str, ContextActor] = {}

    def context(self, context_id: str) -> ContextActor:
        if context_id not in self.contexts:
            self.contexts[context_id] = ContextActor(context_id, sink=self.log, clock=self.clock)
        return self.contexts[context_id]

    async def ask(
        self, text: str, context: str = "ctx-1", history: Sequence[ChatMessage] = ()
    ) -> TurnOutcome:
        meta = RequestMeta(
            context_id=context,
            tenant_id="t1",
            user_id="u1",
            trace_id="0af7651916cd43dd8448eb211c80319c",
            correlation_id="req",
        )
        request = ChatRequest(
            meta=meta, messages=(*history, ChatMessage(role="user", content=text))
        )
        return await self.service.turn(self.context(context), request)

    async def story(self, context: str = "ctx-1") -> list[tuple[str, Any]]:
        return [(e.type, e.payload) for e in await self.log.read_stream(context)]


def healthy(name: str = "primary-a", model: str = "primary", **kw: Any) -> Deployment:
    return Deployment(name=name, model=model, **kw)


async def test_a_turn_records_every_decision_in_one_append() -> None:
    h = Harness([healthy(), healthy("backup-a", "backup")])
    outcome = await h.ask("I love this product, how does it work?")
    assert outcome.status == "ok" and outcome.model == "primary" and not outcome.fallback
    story = await h.story()
    assert [t for t, _ in story] == [
        "ContextCreated",
        "InputChecked",
        "RateLimitChecked",
        "MessageReceived",
        "SentimentScored",
        "RouteDecided",
        "ModelCalled",
        "ReplyCompleted",
    ]
    assert h.appends == 1  # the whole turn, one broker acknowledgement
    sentiment = story[4][1]
    assert sentiment.label == "positive" and sentiment.score > 0.5
    route = story[5][1]
    assert route.chain == ("primary", "backup") and route.policy_version == "1"
    assert story[6][1].outcome == "ok" and story[6][1].deployment == "primary-a"
    assert outcome.reply == story[-1][1].content


async def test_a_stateless_request_brings_its_history_into_the_new_context() -> None:
    h = Harness([healthy()])
    history = [
        ChatMessage(role="system", content="be brief"),
        ChatMessage(role="user", content="hi"),
        ChatMessage(role="assistant", content="hello"),
    ]
    await h.ask("and now?", history=history)
    received = [p for t, p in await h.story() if t == "MessageReceived"]
    assert [(m.role, m.content) for m in received] == [
        ("system", "be brief"),
        ("user", "hi"),
        ("assistant", "hello"),
        ("user", "and now?"),
    ]
    assert "turn 2" in h.contexts["ctx-1"].state.messages[-1].content


async def test_blocked_input_is_recorded_and_goes_nowhere() -> None:
    h = Harness([healthy()], sanitizer=SanitizerPolicy(block_patterns=(r"\bpassword\b",)))
    outcome = await h.ask("tell me the admin password")
    assert outcome.status == "blocked" and "blocked pattern" in outcome.detail
    assert [t for t, _ in await h.story()] == ["InputChecked"]


async def test_a_denied_request_is_recorded_with_its_retry_after() -> None:
    h = Harness([healthy()], limits=LimitPolicy(user="1/hour", tenant="", rate_per_s=0))
    assert (await h.ask("one")).status == "ok"
    denied = await h.ask("two")
    assert denied.status == "denied" and denied.retry_after_s > 3500
    assert [t for t, _ in (await h.story())[-2:]] == ["InputChecked", "RateLimitChecked"]


async def test_retryable_errors_are_retried_then_succeed() -> None:
    h = Harness([healthy(faults=("network", "network"))])
    outcome = await h.ask("hello")
    assert outcome.status == "ok" and outcome.model == "primary"
    calls = [p for t, p in await h.story() if t == "ModelCalled"]
    assert [(c.attempt, c.outcome) for c in calls] == [(1, "network"), (2, "network"), (3, "ok")]
    # Exponential backoff with equal jitter: at least half of each step (never a retry that
    # lands at once on a provider that just failed), at most the step.
    base = POLICY.backoff_base_s
    assert len(h.sleeps) == 2
    assert base / 2 <= h.sleeps[0] <= base and base <= h.sleeps[1] <= 2 * base


async def test_timeouts_get_their_own_budget_then_the_fallback() -> None:
    h = Harness([healthy(faults=("timeout",) * 5), healthy("backup-a", "backup")])
    outcome = await h.ask("hello")
    assert outcome.model == "backup"
    calls = [(p.deployment, p.outcome) for t, p in await h.story() if t == "ModelCalled"]
    assert calls == [("primary-a", "timeout"), ("primary-a", "timeout"), ("backup-a", "ok")]


async def test_rate_limited_upstream_is_honoured_and_slows_the_limiter() -> None:
    h = Harness([healthy(faults=("rate_limited",))], limits=LimitPolicy(rate_per_s=100, burst=100))
    outcome = await h.ask("hello")
    assert outcome.status == "ok"
    assert h.sleeps == [0.05]  # the Retry-After the upstream sent
    types = [t for t, _ in await h.story()]
    assert "RateAdjusted" in types  # the adaptive limiter lowered the rate
    assert h.service.limiter.factor == 0.5


async def test_one_deployments_429s_do_not_slow_the_tenant_while_another_is_fine() -> None:
    h = Harness(
        [healthy("backup-a", "backup"), healthy(faults=("rate_limited",) * 3)],
        limits=LimitPolicy(rate_per_s=100, burst=100),
    )
    for text in ("one", "two", "three"):
        assert (await h.ask(text)).status == "ok"
    story = await h.story()
    assert ("primary-a", "rate_limited") in [
        (p.deployment, p.outcome) for t, p in story if t == "ModelCalled"
    ]
    # backup-a answered every time: the upstream as a whole is not rate-limited.
    assert "RateAdjusted" not in [t for t, _ in story]
    assert h.service.limiter.factor == 1.0


async def test_content_policy_fails_without_retry_or_fallback() -> None:
    h = Harness([healthy(faults=("content_policy",)), healthy("backup-a", "backup")])
    outcome = await h.ask("hello")
    assert outcome.status == "failed" and outcome.error_class == "content_policy"
    story = await h.story()
    assert [(p.deployment, p.outcome) for t, p in story if t == "ModelCalled"] == [
        ("primary-a", "content_policy")
    ]
    assert story[-1][0] == "ReplyFailed"
    # The failure is filed under the model that failed, not the chain's untried fallback.
    assert story[-1][1].model == "primary"


async def test_context_too_long_goes_straight_to_the_fallback_model() -> None:
    h = Harness([healthy(faults=("context_too_long",)), healthy("backup-a", "backup")])
    outcome = await h.ask("hello")
    assert outcome.status == "ok" and outcome.model == "backup"
    assert outcome.fallback  # a fallback of the chain answered, not the routed model
    replied = [p for t, p in await h.story() if t == "ReplyCompleted"]
    assert replied[-1].fallback and replied[-1].model == "backup"
    calls = [(p.deployment, p.outcome) for t, p in await h.story() if t == "ModelCalled"]
    assert calls == [("primary-a", "context_too_long"), ("backup-a", "ok")]


async def test_malformed_responses_are_retried_once_then_fall_back() -> None:
    h = Harness([healthy(faults=("malformed_response",) * 2), healthy("backup-a", "backup")])
    outcome = await h.ask("hello")
    assert outcome.model == "backup"
    calls = [(p.deployment, p.attempt, p.outcome) for t, p in await h.story() if t == "ModelCalled"]
    assert calls == [
        ("primary-a", 1, "malformed_response"),
        ("primary-a", 2, "malformed_response"),
        ("backup-a", 1, "ok"),
    ]


async def test_breaker_opens_after_repeated_failures_and_is_then_skipped() -> None:
    h = Harness([healthy(down=True), healthy("backup-a", "backup")])
    first = await h.ask("one")
    assert first.status == "ok" and first.model == "backup"
    story = await h.story()
    calls = [(p.deployment, p.outcome) for t, p in story if t == "ModelCalled"]
    # 3 network failures (the retry rule) trip the breaker at its third failure.
    assert calls == [("primary-a", "network")] * 3 + [("backup-a", "ok")]
    changes = [p for t, p in story if t == "CircuitChanged"]
    assert [(c.deployment, c.from_state, c.to_state) for c in changes] == [
        ("primary-a", "closed", "open")
    ]
    # A new conversation's request does not wait on the broken deployment.
    await h.ask("two", context="ctx-2")
    later = [(p.deployment, p.outcome) for t, p in await h.story("ctx-2") if t == "ModelCalled"]
    assert later == [("primary-a", "circuit_open"), ("backup-a", "ok")]


async def test_when_every_model_is_down_the_demo_model_answers_as_a_fallback() -> None:
    h = Harness([healthy(down=True), healthy("backup-a", "backup", down=True)])
    outcome = await h.ask("anyone there?")
    assert outcome.status == "ok" and outcome.fallback and outcome.model == "demo-fallback"
    assert outcome.reply.startswith(FALLBACK_NOTE)
    final = (await h.story())[-1][1]
    assert final.fallback and final.content == outcome.reply


async def test_without_the_demo_fallback_the_last_error_is_reported() -> None:
    policy = RoutingPolicy(
        **{**{f: getattr(POLICY, f) for f in POLICY.__struct_fields__}, "demo_fallback": False}
    )
    h = Harness([healthy(down=True), healthy("backup-a", "backup", down=True)], policy=policy)
    outcome = await h.ask("anyone there?")
    assert outcome.status == "failed" and outcome.error_class == "network"


async def _stream_story(h: Harness) -> tuple[list[Any], TurnOutcome]:
    meta = RequestMeta(
        context_id="s", tenant_id="t1", user_id="u", trace_id="0" * 31 + "1", correlation_id="r"
    )
    request = ChatRequest(
        meta=meta, messages=(ChatMessage(role="user", content="tell me a story"),)
    )
    pieces = [item async for item in h.service.stream(h.context("s"), request)]
    outcome = pieces.pop()
    assert isinstance(outcome, TurnOutcome)
    return pieces, outcome


async def test_a_stream_cut_mid_answer_is_continued_by_a_fallback_from_a_prefill() -> None:
    h = Harness([healthy(faults=("stream_cut",)), healthy("backup-a", "backup")])
    pieces, outcome = await _stream_story(h)
    whole = (await Harness([healthy()]).ask("tell me a story")).reply
    # The caller read one answer: the cut part, then only the fallback's continuation.
    assert outcome.status == "ok" and "".join(pieces) == whole == outcome.reply
    assert outcome.model == "backup" and outcome.fallback
    calls = [p for t, p in await h.story("s") if t == "ModelCalled"]
    assert [(c.model, c.outcome) for c in calls] == [("primary", "network"), ("backup", "ok")]
    assert calls[1].detail.startswith("continued a cut answer")
    final = (await h.story("s"))[-1][1]
    assert final.content == whole and final.fallback


async def test_a_cut_stream_is_restarted_on_a_fallback_without_prefill_and_sent_once() -> None:
    # The backup takes no assistant prefill: it is asked from the start, and what it says
    # is passed on only after it has repeated the text the caller already has.
    h = Harness([healthy(faults=("stream_cut",)), healthy("backup-a", "backup", supports=())])
    pieces, outcome = await _stream_story(h)
    whole = (await Harness([healthy()]).ask("tell me a story")).reply
    assert outcome.status == "ok" and "".join(pieces) == whole == outcome.reply
    calls = [p for t, p in await h.story("s") if t == "ModelCalled"]
    assert calls[-1].outcome == "ok" and calls[-1].detail.startswith("restarted a cut answer")


class _Different:
    """A provider whose answer is not the one the cut model had begun."""

    name = "other"

    async def stream(self, messages: Any, options: Any = None) -> Any:
        for word in ("Something", " else", " entirely."):
            yield word

    async def complete(self, messages: Any, options: Any = None) -> Completion:
        return Completion(content="Something else entirely.", model="other")


async def test_a_cut_stream_no_fallback_can_continue_fails_with_the_cut_not_a_short_reply() -> None:
    # The backup refuses a prefill and its answer from the start differs: the turn fails
    # with the error that cut the stream, never a truncated answer presented as whole.
    h = Harness([healthy(faults=("stream_cut",)), healthy("backup-a", "backup", supports=())])
    h.service.providers = {**h.service.providers, "backup-a": _Different()}  # type: ignore[dict-item]
    pieces, outcome = await _stream_story(h)
    assert outcome.status == "failed" and outcome.error_class == "network"
    assert "stream cut" in outcome.detail and "no fallback continued" in outcome.detail
    assert "differs from the text already sent" in outcome.detail
    assert any(isinstance(p, str) for p in pieces)  # part of the answer had been sent
    assert (await h.story("s"))[-1][0] == "ReplyFailed"


async def test_a_cut_answer_nobody_saw_yet_is_retried_not_returned_short() -> None:
    h = Harness([healthy(faults=("stream_cut",)), healthy("backup-a", "backup")])
    outcome = await h.ask("tell me a story")  # not streamed: the caller sees the end only
    assert outcome.status == "ok"
    calls = [p for t, p in await h.story() if t == "ModelCalled"]
    assert calls[0].outcome != "ok" and calls[-1].outcome == "ok"
    reply = (await h.story())[-1][1]
    assert reply.content == outcome.reply and not reply.fallback
    other = Harness([healthy()])
    assert (await other.ask("tell me a story")).reply == outcome.reply  # whole, not cut


async def test_conversations_stick_to_their_model_and_deployments_are_balanced() -> None:
    policy = RoutingPolicy(
        bands=(
            Band(name="short", max_complexity=0.05, model="small"),
            Band(name="long", max_complexity=1.0, model="big"),
        ),
        fallbacks={},
    )
    h = Harness(
        [healthy("small-a", "small"), healthy("small-b", "small"), healthy("big-a", "big")],
        policy=policy,
    )
    first = await h.ask("hi")
    assert first.model == "small"
    # A long, code-heavy follow-up would route to "big", but the conversation sticks.
    second = await h.ask(
        "def f(x):\n    return x\n```python\nimport os\n``` explain? and why? " * 5
    )
    assert second.model == "small"
    routes = [p for t, p in await h.story() if t == "RouteDecided"]
    assert [r.reason for r in routes] == ["table", "sticky"]
    deployments = [p.deployment for t, p in await h.story() if t == "ModelCalled"]
    assert deployments == ["small-a", "small-b"]


def test_unknown_models_in_the_routing_table_are_a_clear_error() -> None:
    with pytest.raises(ValueError, match="without deployments: \\['primary'\\]"):
        ModelRouter(POLICY, [healthy("b", "backup")])


def test_retry_rules_are_configurable_per_error_class() -> None:
    rules = {**POLICY.retries, "network": RetryRule(attempts=1, then="fail")}
    assert RoutingPolicy(retries=rules).retries["network"].then == "fail"


class Recording:
    """A provider that remembers what it was asked (pure logic under test: the prompt)."""

    name = "primary"

    def __init__(self) -> None:
        self.seen: list[list[ChatMessage]] = []

    async def stream(self, messages: Sequence[ChatMessage], options: Any = None) -> Any:
        self.seen.append(list(messages))
        yield "ok"

    async def complete(self, messages: Sequence[ChatMessage], options: Any = None) -> Completion:
        self.seen.append(list(messages))
        return Completion(content="ok", model=self.name)


async def test_context_overrides_and_documents_reach_the_model() -> None:
    from events import ContextConfigured, DocumentAttached

    h = Harness([healthy(), healthy("backup-a", "backup")])
    recorder = Recording()
    h.service.providers = {"primary-a": recorder, "backup-a": recorder}  # type: ignore[dict-item]
    context = h.context("ctx-1")
    meta = RequestMeta(
        context_id="ctx-1",
        tenant_id="t1",
        user_id="u1",
        trace_id="0" * 31 + "1",
        correlation_id="c",
    )
    await context.record(
        [
            ContextConfigured(
                overrides={"system_prompt": "Answer in Portuguese.", "model": "backup"}
            ),
            DocumentAttached(
                document_id="d1",
                name="faq.txt",
                mime_type="text/plain",
                size=5,
                sha256="0" * 64,
                content=b"Tram!",
            ),
            DocumentAttached(
                document_id="d2",
                name="logo.png",
                mime_type="image/png",
                size=3,
                sha256="1" * 64,
                content=b"\x89PN",
            ),
        ],
        meta,
    )
    outcome = await h.ask("hello")
    assert outcome.model == "backup"  # the context's model override
    route = next(p for t, p in await h.story() if t == "RouteDecided")
    assert route.reason == "requested"
    (prompt,) = recorder.seen
    assert [(m.role, m.content) for m in prompt] == [
        ("system", "Answer in Portuguese."),
        ("system", "Attached document faq.txt:\nTram!"),  # text documents only
        ("user", "hello"),
    ]


async def fan(h: Harness, merge: str, context: str = "f") -> list[Any]:
    meta = RequestMeta(
        context_id=context, tenant_id="t1", user_id="u", trace_id="0" * 31 + "1", correlation_id="c"
    )
    request = ChatRequest(
        meta=meta,
        messages=(ChatMessage(role="user", content="compare yourselves"),),
        fanout=("primary", "backup"),
        merge=merge,  # type: ignore[arg-type]
    )
    return [item async for item in h.service.stream(h.context(context), request)]


async def test_fan_out_all_streams_every_answer_side_by_side() -> None:
    h = Harness([healthy(), healthy("backup-a", "backup")])
    items = await fan(h, "all")
    outcome = items[-1]
    assert outcome.status == "ok" and [c.model for c in outcome.choices] == ["primary", "backup"]
    for index, choice in enumerate(outcome.choices):
        assert "".join(p.text for p in items[:-1] if p.index == index) == choice.content
    story = [t for t, _ in await h.story("f")]
    assert story.count("RouteDecided") == 2 and story.count("ReplyCompleted") == 2


async def test_fan_out_first_keeps_the_first_answer_and_cancels_the_rest() -> None:
    h = Harness([healthy(latency_ms=300), healthy("backup-a", "backup")])
    items = await fan(h, "first")
    outcome = items[-1]
    assert outcome.model == "backup" and outcome.choices == ()
    assert [p.text for p in items[:-1]] == [outcome.reply]  # the winner, whole
    calls = {p.deployment: p.outcome for t, p in await h.story("f") if t == "ModelCalled"}
    assert calls == {"backup-a": "ok", "primary-a": "cancelled"}
    assert [t for t, _ in await h.story("f")].count("ReplyCompleted") == 1


class Counting(Recording):
    """Which of the provider's two calls a turn made."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    async def stream(self, messages: Sequence[ChatMessage], options: Any = None) -> Any:
        self.calls.append("stream")
        yield "o"
        yield "k"

    async def complete(self, messages: Sequence[ChatMessage], options: Any = None) -> Completion:
        self.calls.append("complete")
        return Completion(content="ok", model=self.name)


async def test_a_whole_turn_asks_for_a_whole_answer_and_a_streamed_one_streams() -> None:
    h = Harness([healthy()])
    provider = Counting()
    h.service.providers = {"primary-a": provider}  # type: ignore[dict-item]
    whole = await h.ask("hi")
    assert whole.reply == "ok" and provider.calls == ["complete"]
    meta = RequestMeta(
        context_id="ctx-1", tenant_id="t1", user_id="u1", trace_id="1" * 32, correlation_id="c"
    )
    request = ChatRequest(meta=meta, messages=(ChatMessage(role="user", content="again"),))
    items = [i async for i in h.service.stream(h.context("ctx-1"), request)]
    assert provider.calls == ["complete", "stream"]
    assert [i for i in items if isinstance(i, str)] == ["o", "k"]


def test_a_text_bound_cuts_at_max_tokens_and_before_a_stop_sequence() -> None:
    from actors.chat import TextBound

    def run(pieces: list[str], max_tokens: int | None, stop: tuple[str, ...]) -> tuple[str, Any]:
        bound = TextBound(max_tokens, stop)
        out = "".join(bound.feed(p) for p in pieces) + bound.close()
        return out, bound.finish

    words = ["one", " two", " thr", "ee", " four", " five"]
    assert run(words, 3, ()) == ("one two three", "length")
    assert run(words, 6, ()) == ("one two three four five", None)  # fewer than asked: whole
    # A stop sequence split across pieces is still found, and never shown.
    assert run(["hello wo", "rld. END", " more"], None, ("END",)) == ("hello world. ", "stop")
    assert run(["a b", "c d"], None, ("XYZ",)) == ("a bc d", None)  # held back, then let go
    assert run(["a b c d e"], 2, ("d",)) == ("a b", "length")


async def test_max_tokens_and_stop_bound_the_reply_streamed_and_not() -> None:
    from actors.chat import GenerationOptions

    h = Harness([healthy()])
    meta = RequestMeta(
        context_id="ctx-b", tenant_id="t1", user_id="u1", trace_id="2" * 32, correlation_id="c"
    )
    whole = await h.service.turn(
        h.context("ctx-b"),
        ChatRequest(
            meta=meta,
            messages=(ChatMessage(role="user", content="tell me"),),
            options=GenerationOptions(max_tokens=3),
        ),
    )
    assert whole.finish_reason == "length" and len(whole.reply.split()) == 3
    streamed = [
        i
        async for i in h.service.stream(
            h.context("ctx-b"),
            ChatRequest(
                meta=meta,
                messages=(ChatMessage(role="user", content="tell me more"),),
                options=GenerationOptions(max_tokens=2),
            ),
        )
    ]
    outcome = streamed[-1]
    assert isinstance(outcome, TurnOutcome) and outcome.finish_reason == "length"
    assert "".join(i for i in streamed if isinstance(i, str)) == outcome.reply
    assert len(outcome.reply.split()) == 2
    # The recorded reply is what the caller got, with why it ended.
    replies = [p for t, p in await h.story("ctx-b") if t == "ReplyCompleted"]
    assert [(r.content, r.finish_reason) for r in replies] == [
        (whole.reply, "length"),
        (outcome.reply, "length"),
    ]


async def test_each_event_of_a_turn_carries_when_it_happened() -> None:
    """The audit trail shows the waits between a turn's attempts: each ModelCalled at the end
    of its call, what came before the calls at the turn's start, in stream order."""
    from datetime import timedelta

    h = Harness([healthy(faults=("network", "network"))])
    waited = timedelta()
    ticking = h.clock.now

    def now() -> Any:
        return ticking() + waited

    async def sleep(seconds: float) -> None:
        nonlocal waited
        waited += timedelta(seconds=seconds)

    h.clock.now = now  # type: ignore[method-assign]
    h.service.sleep = sleep
    await h.ask("hello")
    events = await h.log.read_stream("ctx-1")
    times = [e.occurred_at for e in events]
    assert times == sorted(times)
    received = next(e for e in events if e.type == "MessageReceived")
    calls = [e for e in events if e.type == "ModelCalled"]
    reply = next(e for e in events if e.type == "ReplyCompleted")
    assert len(calls) == 3
    assert received.occurred_at < calls[0].occurred_at
    # Between two attempts lies at least the backoff that separated them.
    base = POLICY.backoff_base_s
    assert calls[1].occurred_at - calls[0].occurred_at >= timedelta(seconds=base / 2)
    assert calls[2].occurred_at - calls[1].occurred_at >= timedelta(seconds=base)
    assert reply.occurred_at >= calls[2].occurred_at


LOOKUP = {
    "type": "function",
    "function": {
        "name": "lookup",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
        },
    },
}


async def test_a_forced_tool_call_is_answered_recorded_and_its_result_continues_the_turn() -> None:
    h = Harness([healthy(), healthy("backup-a", "backup")])
    meta = RequestMeta(
        context_id="t", tenant_id="t1", user_id="u", trace_id="0" * 31 + "1", correlation_id="r"
    )
    options = GenerationOptions(
        tools=[LOOKUP], tool_choice={"type": "function", "function": {"name": "lookup"}}
    )
    asked = ChatRequest(
        meta=meta,
        messages=(ChatMessage(role="user", content="find the latest invoices"),),
        options=options,
    )
    outcome = await h.service.turn(h.context("t"), asked)
    assert outcome.status == "ok" and outcome.finish_reason == "tool_calls"
    [call] = outcome.tool_calls
    assert call.name == "lookup" and call.id.startswith("call_")
    assert json.loads(call.arguments) == {"query": "find the latest invoices", "limit": 4}
    reply = (await h.story("t"))[-1][1]
    assert reply.tool_calls == outcome.tool_calls  # the events keep the call
    # The caller runs the tool and sends its result: the model sees the call and the result.
    result = ChatRequest(
        meta=meta,
        messages=(ChatMessage(role="tool", content='{"invoices": 3}', tool_call_id=call.id),),
        options=GenerationOptions(tools=[LOOKUP]),
    )
    seen: list[Any] = []
    provider = h.service.providers["primary-a"]
    original = provider.stream

    def spying(messages: Any, options: Any = None) -> Any:
        seen.extend(messages)
        return original(messages, options)

    provider.stream = spying  # type: ignore[method-assign]
    after = await h.service.turn(h.context("t"), result)
    assert after.status == "ok" and after.finish_reason == "stop" and not after.tool_calls
    assert [(m.role, m.tool_call_id, m.tool_calls) for m in seen[-2:]] == [
        ("assistant", "", (call,)),
        ("tool", call.id, ()),
    ]
    received = [p for t, p in await h.story("t") if t == "MessageReceived"][-1]
    assert received.role == "tool" and received.tool_call_id == call.id


async def test_a_model_without_tools_is_not_routed_a_request_that_uses_them() -> None:
    h = Harness([healthy(supports=()), healthy("backup-a", "backup")])
    meta = RequestMeta(
        context_id="c", tenant_id="t1", user_id="u", trace_id="0" * 31 + "1", correlation_id="r"
    )
    request = ChatRequest(
        meta=meta,
        messages=(ChatMessage(role="user", content="look it up"),),
        options=GenerationOptions(tools=[LOOKUP], tool_choice="required"),
    )
    outcome = await h.service.turn(h.context("c"), request)
    assert outcome.model == "backup" and outcome.tool_calls
    route = next(p for t, p in await h.story("c") if t == "RouteDecided")
    assert route.chain == ("backup",)
