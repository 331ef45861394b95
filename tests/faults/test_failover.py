"""Failover conduct against an OpenAI-compatible upstream that breaks in 16 ways (issue 16):
`chatllm up` with one deployment per fault (tests/fault_upstream.py), asked through the
official `openai` SDK, streamed and not. Each case checks what the caller gets, what the
upstream saw (how often, how far apart), and what the audit trail shows.

Two profiles: "fast" (the default, in `make test`: waits of a second or two) and "full"
(`make test-failover`, FAILOVER_PROFILE=full: the issue's own numbers, a first token after
20 s, a primary down for 60 s)."""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from benchmarks.bench_gateway import _launch, _stop
from infra.adapters.kafka.broker import free_port
from tests.e2e.conftest import Service, start_service, stop_service
from tests.fault_upstream import PROMPT_TOKENS, TOKENS

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
WHOLE = " ".join(TOKENS)
WHOLE_SUFFIX = "-w"


@dataclass(frozen=True)
class Profile:
    slow_s: float  # the slow first token's delay
    first_token_timeout_s: float
    stall_timeout_s: float
    timeout_s: float
    down_s: float  # how long the flapping primary is down
    retry_after: int
    breaker_reset_s: float
    flap_every_s: float  # the pace of case 15's twenty requests


PROFILES = {
    "fast": Profile(1.0, 2.0, 1.0, 2.0, 3.0, 1, 1.0, 0.25),
    "full": Profile(20.0, 30.0, 10.0, 60.0, 60.0, 2, 10.0, 4.0),
}
PROFILE = PROFILES[os.environ.get("FAILOVER_PROFILE", "fast")]

CASES = {  # chat-llm model → (the upstream's fault, its fallbacks)
    "case1": ("r429-once", ["ok"]),
    "case2": ("r429-always", ["ok"]),
    "case3": ("e500-once", ["ok"]),
    "case4": ("e503-always", ["ok"]),
    "case5": ("reset", ["ok"]),
    "case6": ("hang", ["ok"]),
    "case7": ("slow-first", ["ok"]),
    "case8": ("cut", ["ok"]),
    "case9": ("stall", ["ok"]),
    "case10": ("malformed", ["ok"]),
    "case11": ("nodone", ["ok"]),
    "case12": ("ctx-small", ["case12-same", "case12-large"]),
    "case13": ("filtered", ["ok"]),
    "case14": ("cut2", ["case14-fallback"]),
    "case15": ("flap", ["ok"]),
    "case16": ("e503-always", ["ok"]),
}
EXTRA = {  # fallbacks that are not cases: (upstream, context window, capabilities)
    "ok": ("ok", 0, ["prefill", "tools", "logprobs"]),
    "case12-same": ("ok-small", 4096, []),
    "case12-large": ("ok-large", 128_000, []),
    "case14-fallback": ("ok-noprefill", 0, ["prefill"]),
}


def _config(upstream: str) -> str:
    p = PROFILE
    fallbacks = ", ".join(
        f"{m}{suffix} = {chain!r}".replace("'", '"')
        for m, (_, chain) in CASES.items()
        for suffix in ("", WHOLE_SUFFIX)
    )
    lines = [
        "[routing]",
        "demo_fallback = false",
        "backoff_base_s = 0.2",
        "backoff_max_s = 1.0",
        "breaker_fail_max = 3",
        f"breaker_reset_s = {p.breaker_reset_s}",
        'bands = [{name = "all", max_complexity = 1.0, model = "ok"}]',
        f"fallbacks = {{{fallbacks}}}",
        "",
    ]
    # Each case twice, `caseN` for streamed requests and `caseN-w` for whole ones, so that
    # one mode's failures (and the breaker they open) do not meet the other's.
    deployments = {
        m + suffix: (fault, 4096 if m == "case12" else 0, [])
        for m, (fault, _) in CASES.items()
        for suffix in ("", WHOLE_SUFFIX)
    }
    for model, (fault, window, supports) in {**deployments, **EXTRA}.items():
        lines += [
            "[[deployments]]",
            f'name = "{model}-a"',
            f'model = "{model}"',
            'provider = "openai"',
            f'base_url = "{upstream}/v1"',
            f'upstream_model = "{fault}"',
            f"timeout_s = {p.timeout_s}",
            f"first_token_timeout_s = {p.first_token_timeout_s}",
            f"stall_timeout_s = {p.stall_timeout_s}",
            f"context_window = {window}",
            "extra_params = " + ('["top_k"]' if model == "ok" else "[]"),
            f"supports = {supports!r}".replace("'", '"'),
            "",
        ]
    return "\n".join(lines)


@dataclass
class Stack:
    service: Service
    upstream: str

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.service.base}/v1", api_key="sk-x", max_retries=0,
                             timeout=300)  # fmt: skip

    def reset(self) -> None:
        httpx.post(f"{self.upstream}/reset").raise_for_status()

    def seen(self) -> list[dict[str, Any]]:
        """What the upstream was asked: model (its fault), t (s), prefill (tokens)."""
        log: list[dict[str, Any]] = httpx.get(f"{self.upstream}/log").json()
        return log

    def calls(self, context_id: str) -> list[dict[str, Any]]:
        """The turn's ModelCalled events, from the audit trail."""
        events = httpx.get(f"{self.service.base}/v1/contexts/{context_id}/events").json()
        return [e["event"]["payload"] for e in events if e["type"] == "ModelCalled"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    port = free_port()
    p = PROFILE
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "FAULT_SLOW_S": str(p.slow_s),
        "FAULT_DOWN_S": str(p.down_s),
        "FAULT_RETRY_AFTER": str(p.retry_after),
    }
    proc, upstream = _launch(
        [sys.executable, "-m", "tests.fault_upstream", str(port)],
        port,
        env,
        tmp_path_factory.mktemp("fault-upstream"),
    )
    try:
        service = start_service(tmp_path_factory.mktemp("failover"), _config(upstream))
        try:
            yield Stack(service, upstream)
        finally:
            stop_service(service)
    finally:
        _stop(proc)


@dataclass
class Answer:
    text: str
    model: str
    usage: Any
    context_id: str
    seconds: float
    finish_reason: str | None


def ask(stack: Stack, model: str, stream: bool) -> Answer:
    """One request as the SDK sends it; the stream read to its end."""
    stack.reset()
    client = stack.client()
    model = model if stream else model + WHOLE_SUFFIX
    messages: Any = [{"role": "user", "content": f"tell me about {model}"}]
    started = time.monotonic()
    if not stream:
        raw = client.chat.completions.with_raw_response.create(model=model, messages=messages)
        completion = raw.parse()
        choice = completion.choices[0]
        return Answer(choice.message.content or "", _case(completion.model), completion.usage,
                      raw.headers["x-context-id"], time.monotonic() - started,
                      choice.finish_reason)  # fmt: skip
    raw_stream = client.chat.completions.with_raw_response.create(
        model=model, messages=messages, stream=True, stream_options={"include_usage": True}
    )
    text, served, usage, finish = "", "", None, None
    for chunk in raw_stream.parse():
        served = chunk.model or served
        usage = chunk.usage or usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return Answer(text, _case(served), usage, raw_stream.headers["x-context-id"],
                  time.monotonic() - started, finish)  # fmt: skip


MODES = pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])


def _case(model: str) -> str:
    return model.removesuffix(WHOLE_SUFFIX)


def outcomes(calls: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(_case(c["model"]), c["outcome"]) for c in calls]


def gaps(stack: Stack, fault: str) -> list[float]:
    times = [r["t"] for r in stack.seen() if r["model"] == fault]
    return [b - a for a, b in itertools.pairwise(times)]


@MODES
def test_case01_429_with_retry_after_once_is_honoured_then_answered(
    stack: Stack, stream: bool
) -> None:
    answer = ask(stack, "case1", stream)
    assert answer.text == WHOLE and answer.model == "case1"
    assert [r["model"] for r in stack.seen()] == ["r429-once"] * 2
    # It waited as long as Retry-After said before asking again.
    assert gaps(stack, "r429-once")[0] >= PROFILE.retry_after - 0.05
    calls = stack.calls(answer.context_id)
    assert outcomes(calls) == [("case1", "rate_limited"), ("case1", "ok")]
    assert calls[0]["retry_after_s"] == PROFILE.retry_after


@MODES
def test_case02_persistent_429_backs_off_with_jitter_then_fails_over(
    stack: Stack, stream: bool
) -> None:
    answer = ask(stack, "case2", stream)
    assert answer.text == WHOLE and answer.model == "ok"
    tried = gaps(stack, "r429-always")
    # Three tries, never hammering: each wait at least half of its exponential step.
    assert len(tried) == 2 and tried[0] >= 0.1 - 0.02 and tried[1] >= 0.2 - 0.02
    # Exponential with jitter (0.1-0.2 s, then 0.2-0.4 s), not a fixed wait.
    assert tried[0] < tried[1] < 0.4 + 0.1
    calls = stack.calls(answer.context_id)
    assert outcomes(calls) == [("case2", "rate_limited")] * 3 + [("ok", "ok")]


@MODES
def test_case03_a_500_once_is_retried_on_the_same_deployment(stack: Stack, stream: bool) -> None:
    answer = ask(stack, "case3", stream)
    assert answer.text == WHOLE and answer.model == "case3"
    assert [r["model"] for r in stack.seen()] == ["e500-once"] * 2
    assert outcomes(stack.calls(answer.context_id)) == [("case3", "network"), ("case3", "ok")]


@MODES
def test_case04_persistent_503_fails_over_within_the_retry_budget(
    stack: Stack, stream: bool
) -> None:
    answer = ask(stack, "case4", stream)
    assert answer.text == WHOLE and answer.model == "ok"
    seen = [r["model"] for r in stack.seen()]
    assert seen.count("e503-always") <= 3 and seen[-1] == "ok"
    assert answer.seconds < 10


@MODES
def test_case05_a_tcp_reset_before_headers_is_retried_then_failed_over(
    stack: Stack, stream: bool
) -> None:
    answer = ask(stack, "case5", stream)
    assert answer.text == WHOLE and answer.model == "ok"
    calls = stack.calls(answer.context_id)
    assert next(o for m, o in outcomes(calls) if m == "case5") == "network"


@MODES
def test_case06_no_response_times_out_well_before_the_provider_then_fails_over(
    stack: Stack, stream: bool
) -> None:
    answer = ask(stack, "case6", stream)
    assert answer.text == WHOLE and answer.model == "ok"
    calls = stack.calls(answer.context_id)
    assert outcomes(calls)[-1] == ("ok", "ok")
    assert {o for m, o in outcomes(calls) if m == "case6"} == {"timeout"}
    limit = PROFILE.first_token_timeout_s if stream else PROFILE.timeout_s
    # Two tries of the limit each, and a backoff: far below a provider's 10 minutes.
    assert answer.seconds < 2 * limit + 3


@MODES
def test_case07_a_slow_first_token_is_waited_for_within_the_limit(
    stack: Stack, stream: bool
) -> None:
    answer = ask(stack, "case7", stream)
    assert answer.text == WHOLE and answer.model == "case7"
    assert answer.seconds >= PROFILE.slow_s
    assert outcomes(stack.calls(answer.context_id)) == [("case7", "ok")]


@MODES
def test_case08_a_cut_stream_is_finished_by_a_fallback_from_a_prefill(
    stack: Stack, stream: bool
) -> None:
    answer = ask(stack, "case8", stream)
    # One whole answer: never a truncated one, never the cut part twice.
    assert answer.text == WHOLE and answer.model == "ok" and answer.finish_reason == "stop"
    if stream:
        assert [(r["model"], r["prefill"]) for r in stack.seen()] == [("cut", 0), ("ok", 40)]
        calls = stack.calls(answer.context_id)
        assert calls[-1]["detail"].startswith("continued a cut answer")


@MODES
def test_case09_a_stalled_stream_is_detected_and_the_service_stays_healthy(
    stack: Stack, stream: bool
) -> None:
    answer = ask(stack, "case9", stream)
    assert answer.text == WHOLE and answer.model == "ok"
    calls = stack.calls(answer.context_id)
    assert outcomes(calls)[0] == ("case9", "timeout")
    if stream:
        assert "stalled" in calls[0]["detail"]
        assert [(r["model"], r["prefill"]) for r in stack.seen()][-1] == ("ok", 20)
    after = ask(stack, "case3", stream)  # and the next request is served as ever
    assert after.text == WHOLE and httpx.get(f"{stack.service.base}/healthz").status_code == 200


@MODES
def test_case10_a_malformed_chunk_is_never_passed_off_as_a_whole_answer(
    stack: Stack, stream: bool
) -> None:
    answer = ask(stack, "case10", stream)
    assert answer.text == WHOLE
    if stream:
        calls = stack.calls(answer.context_id)
        assert outcomes(calls)[0] == ("case10", "malformed_response")
        assert answer.model == "ok"


@MODES
def test_case11_a_stream_without_done_finishes_promptly_with_its_usage(
    stack: Stack, stream: bool
) -> None:
    answer = ask(stack, "case11", stream)
    assert answer.text == WHOLE and answer.model == "case11"
    assert answer.usage.prompt_tokens == PROMPT_TOKENS
    assert answer.usage.completion_tokens == len(TOKENS)
    assert answer.seconds < 5  # the upstream holds the connection for an hour
    assert outcomes(stack.calls(answer.context_id)) == [("case11", "ok")]


@MODES
def test_case12_context_length_exceeded_goes_to_a_model_with_a_larger_window(
    stack: Stack, stream: bool
) -> None:
    answer = ask(stack, "case12", stream)
    assert answer.text == WHOLE and answer.model == "case12-large"
    # No retry of the small one, and its equally small fallback is not asked.
    assert [r["model"] for r in stack.seen()] == ["ctx-small", "ok-large"]
    assert outcomes(stack.calls(answer.context_id)) == [
        ("case12", "context_too_long"), ("case12-large", "ok")
    ]  # fmt: skip


@MODES
def test_case13_a_content_filter_is_not_retried_and_its_reason_passed_on(
    stack: Stack, stream: bool
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        ask(stack, "case13", stream)
    assert refused.value.code == "content_policy_violation"
    assert "category: violence" in refused.value.message
    assert [r["model"] for r in stack.seen()] == ["filtered"]


@MODES
def test_case14_a_fallback_refusing_the_prefill_restarts_cleanly(
    stack: Stack, stream: bool
) -> None:
    answer = ask(stack, "case14", stream)
    assert answer.text == WHOLE and answer.model == "case14-fallback"
    if stream:
        assert [(r["model"], r["prefill"]) for r in stack.seen()] == [
            ("cut2", 0), ("ok-noprefill", 40), ("ok-noprefill", 0)
        ]  # fmt: skip
        calls = stack.calls(answer.context_id)
        assert outcomes(calls)[-2:] == [
            ("case14-fallback", "bad_request"),
            ("case14-fallback", "ok"),
        ]
        assert calls[-1]["detail"].startswith("restarted a cut answer")


def test_case15_a_primary_down_then_back_is_probed_and_returned_to(stack: Stack) -> None:
    stack.reset()
    client = stack.client()
    served: list[str] = []
    for i in range(20):
        started = time.monotonic()
        completion = client.chat.completions.create(
            model="case15", messages=[{"role": "user", "content": f"request {i}"}]
        )
        assert completion.choices[0].message.content == WHOLE
        served.append(completion.model)
        time.sleep(max(0.0, PROFILE.flap_every_s - (time.monotonic() - started)))
    assert served[0] == "ok" and served[-1] == "case15", served
    # Probed, not hammered: while it was down, at most the first request's tries and one
    # trial call per breaker reset.
    down = [r for r in stack.seen() if r["model"] == "flap" and r["t"] < PROFILE.down_s]
    assert len(down) <= 3 + PROFILE.down_s / PROFILE.breaker_reset_s + 1


@MODES
def test_case16_a_fallback_answer_reports_the_fallbacks_model_and_usage(
    stack: Stack, stream: bool
) -> None:
    answer = ask(stack, "case16", stream)
    assert answer.text == WHOLE and answer.model == "ok"
    # The fallback's own usage, nothing for the failed attempts.
    assert answer.usage.prompt_tokens == PROMPT_TOKENS
    assert answer.usage.completion_tokens == len(TOKENS)
    calls = stack.calls(answer.context_id)
    assert outcomes(calls)[-1] == ("ok", "ok")
    assert {o for m, o in outcomes(calls) if m == "case16"} <= {"network", "circuit_open"}


@MODES
def test_logprobs_and_tool_call_deltas_are_carried_from_an_upstream_that_gives_them(
    stack: Stack, stream: bool
) -> None:
    """Not a fault: what an OpenAI-compatible upstream answers beyond text comes through.
    Log probabilities, asked with top_logprobs, for every token; a forced tool's call,
    which the upstream streams as fragments, whole at the caller."""
    stack.reset()
    client = stack.client()
    ask: Any = [{"role": "user", "content": "tell me with logprobs"}]
    if stream:
        chunks = list(
            client.chat.completions.create(
                model="ok", messages=ask, logprobs=True, top_logprobs=2, stream=True
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        logprobs = [t for c in chunks if c.choices and c.choices[0].logprobs
                    for t in c.choices[0].logprobs.content or []]  # fmt: skip
    else:
        whole = client.chat.completions.create(
            model="ok", messages=ask, logprobs=True, top_logprobs=2
        )
        text = whole.choices[0].message.content or ""
        assert whole.choices[0].logprobs is not None
        logprobs = whole.choices[0].logprobs.content or []
    assert text == WHOLE
    assert [t.token for t in logprobs] == TOKENS
    assert logprobs[2].logprob == -0.03 and len(logprobs[2].top_logprobs) == 2
    # A model that does not declare logprobs is a 400 that names the parameter.
    with pytest.raises(openai.BadRequestError, match="does not support logprobs"):
        client.chat.completions.create(model="case3", messages=ask, logprobs=True)

    tool: Any = {"type": "function", "function": {"name": "search", "parameters": {}}}
    if stream:
        deltas = [
            c.choices[0]
            for c in client.chat.completions.create(
                model="ok", messages=ask, tools=[tool], tool_choice="required", stream=True
            )
            if c.choices
        ]
        calls = [tc for d in deltas for tc in d.delta.tool_calls or []]
        finish = deltas[-1].finish_reason
        [call] = calls
        assert call.function is not None
        name, arguments = call.function.name, call.function.arguments
    else:
        answer = client.chat.completions.create(
            model="ok", messages=ask, tools=[tool], tool_choice="required"
        )
        finish = answer.choices[0].finish_reason
        [whole_call] = answer.choices[0].message.tool_calls or []
        name, arguments = whole_call.function.name, whole_call.function.arguments
    assert finish == "tool_calls" and name == "search"
    assert json.loads(arguments or "") == {"q": "tell me with logprobs"}

    # A parameter beyond OpenAI's that the upstream documents (extra_params) is forwarded
    # as sent; to a model whose deployments do not list it, it is an unknown parameter.
    stack.reset()
    client.chat.completions.create(model="ok", messages=ask, extra_body={"top_k": 5})
    assert [r["top_k"] for r in stack.seen()] == [5]
    with pytest.raises(openai.BadRequestError, match=r"unrecognized request argument.*top_k"):
        client.chat.completions.create(model="case3", messages=ask, extra_body={"top_k": 5})
