"""The OpenAI-compatible API, driven by the official `openai` SDK against `chatllm up`
(real broker, chDB and Ray), with API keys, limits, faults and an OpenAI-compatible upstream."""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from infra.client import ChatClient
from infra.http.security import hash_key
from tests.e2e.conftest import Service, start_service, stop_service

pytestmark = pytest.mark.e2e

KEYS = {
    "alice": "sk-test-alice",
    "carol": "sk-test-carol",
    "loop": "sk-test-loop",
    "dave": "sk-test-dave",
}
TENANTS = {"alice": "acme", "carol": "gamma", "loop": "loop", "dave": "delta"}

CONFIG = (
    """
[auth]
required = true
"""
    + "".join(
        f'[[auth.keys]]\nsha256 = "{hash_key(KEYS[u])}"\ntenant = "{TENANTS[u]}"\nuser = "{u}"\n\n'
        for u in KEYS
    )
    + """
[limits]
user = "25/minute"
rate_per_s = 0

[routing]
breaker_fail_max = 3
backoff_base_s = 0.01

[routing.fallbacks]
flaky = ["demo-1"]
loop = ["demo-1"]
demo-large = ["demo-1"]
demo-1 = ["demo-fast"]
demo-fast = ["demo-1"]

[[deployments]]
name = "demo-fast-a"
model = "demo-fast"

[[deployments]]
name = "demo-1-a"
model = "demo-1"

[[deployments]]
name = "demo-large-a"
model = "demo-large"

[[deployments]]
name = "flaky-a"
model = "flaky"
down = true

[[deployments]]
name = "plain-a"
model = "plain"
supports = []

[[deployments]]
name = "cut-stream-a"
model = "cut-stream"
faults = ["stream_cut"]

[[deployments]]
name = "cut-whole-a"
model = "cut-whole"
faults = ["stream_cut"]

[[deployments]]
name = "loop-a"
model = "loop"
provider = "openai"
base_url = "http://127.0.0.1:{port}/v1"
api_key_env = "LOOP_UPSTREAM_KEY"
upstream_model = "demo-1"
"""
)


class Collector:
    """A minimal OTLP/HTTP trace collector: keeps every span it is sent."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        self.spans: list[dict[str, str]] = []
        spans = self.spans

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                request = ExportTraceServiceRequest.FromString(body)
                for resource in request.resource_spans:
                    service = next(
                        a.value.string_value
                        for a in resource.resource.attributes
                        if a.key == "service.name"
                    )
                    for scope in resource.scope_spans:
                        for span in scope.spans:
                            spans.append(
                                {
                                    "service": service,
                                    "name": span.name,
                                    "trace_id": span.trace_id.hex(),
                                    "span_id": span.span_id.hex(),
                                    "parent": span.parent_span_id.hex(),
                                }
                            )
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    running = Collector()
    yield running
    running.server.shutdown()


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, collector: Collector) -> Iterator[Service]:
    running = start_service(
        tmp_path_factory.mktemp("openai"),
        CONFIG,
        {
            "LOOP_UPSTREAM_KEY": KEYS["loop"],
            "CHATLLM_TRACING__OTLP_ENDPOINT": collector.url,
            "CHATLLM_TRACING__EXPORT_DELAY_MS": "100",
        },
    )
    try:
        yield running
    finally:
        stop_service(running)


def client(api: Service, user: str = "alice") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api.base}/v1", api_key=KEYS[user], max_retries=0)


def audit(
    api: Service, context: str, user: str = "alice", expect_type: str = "ReplyCompleted"
) -> list[Any]:
    """The context's archived events, once the archive has caught up to the reply."""
    deadline = time.monotonic() + 30
    while True:
        rows = httpx.get(
            f"{api.base}/v1/contexts/{context}/events",
            headers={"Authorization": f"Bearer {KEYS[user]}"},
        ).json()
        if any(r["type"] == expect_type for r in rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def test_non_streaming_completion_with_the_openai_sdk(api: Service) -> None:
    completion = client(api).chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "What is an event log?"}]
    )
    assert completion.object == "chat.completion"
    assert "What is an event log?" in (completion.choices[0].message.content or "")
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model in ("demo-fast", "demo-1", "demo-large")
    assert completion.usage is not None and completion.usage.total_tokens > 0


def test_streaming_gives_the_same_answer_piece_by_piece(api: Service) -> None:
    messages: Any = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Explain replay in one line."},
    ]
    whole = client(api).chat.completions.create(model="auto", messages=messages)
    stream = client(api).chat.completions.create(model="auto", messages=messages, stream=True)
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert len([p for p in pieces if p]) > 3  # really streamed, not one blob
    assert "".join(pieces) == whole.choices[0].message.content  # the demo model is deterministic


def test_a_model_cut_off_mid_answer_is_never_a_short_200(api: Service) -> None:
    # Streamed: text already went out, so the stream ends with an error, not [DONE].
    with pytest.raises(openai.APIError, match=r"cut mid-answer"):
        for _ in client(api).chat.completions.create(
            model="cut-stream", stream=True, messages=[{"role": "user", "content": "a story"}]
        ):
            pass
    # Not streamed: nothing went out yet, so the cut try is retried and the answer is whole.
    whole = client(api).chat.completions.create(
        model="cut-whole", messages=[{"role": "user", "content": "a story"}]
    )
    reference = client(api).chat.completions.create(
        model="cut-whole", messages=[{"role": "user", "content": "a story"}]
    )
    assert whole.choices[0].message.content == reference.choices[0].message.content


def test_models_are_listed(api: Service) -> None:
    ids = {m.id for m in client(api).models.list()}
    assert {"demo-fast", "demo-1", "demo-large", "flaky", "loop"} <= ids


def test_keys_are_required_and_checked(api: Service) -> None:
    bad = openai.OpenAI(base_url=f"{api.base}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="invalid API key"):
        bad.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}])
    response = httpx.post(
        f"{api.base}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}
    )
    assert response.status_code == 401 and response.json()["error"]["code"] == "missing_api_key"


def test_bad_requests_are_400_in_openai_shape(api: Service) -> None:
    with pytest.raises(openai.BadRequestError, match="last message must have role 'user'"):
        client(api).chat.completions.create(
            model="auto", messages=[{"role": "assistant", "content": "hi"}]
        )
    response = httpx.post(
        f"{api.base}/v1/chat/completions",
        json={"messages": []},
        headers={"Authorization": f"Bearer {KEYS['alice']}"},
    )
    assert response.status_code == 400 and "messages" in response.json()["error"]["message"]


def test_a_stateful_context_through_the_python_client(api: Service) -> None:
    with ChatClient(api.base, api_key=KEYS["alice"]) as chat:
        first = chat.chat("Plan a day in Lisbon", context="py-client-ctx")
        second = chat.chat("And the evening?", context="py-client-ctx")
    assert first.context_id == second.context_id == "py-client-ctx"
    assert "turn 2" in second.content  # the service kept the conversation


def test_rate_limit_is_exact_under_concurrency_and_every_denial_is_audited(api: Service) -> None:
    async def flood() -> list[Any]:
        carol = openai.AsyncOpenAI(base_url=f"{api.base}/v1", api_key=KEYS["carol"], max_retries=0)

        async def one(i: int) -> Any:
            try:
                return await carol.chat.completions.with_raw_response.create(
                    model="auto",
                    messages=[{"role": "user", "content": f"request {i}"}],
                    extra_headers={"X-Context-Id": f"flood-{i % 8}"},
                )
            except openai.RateLimitError as exc:
                return exc

        try:
            return await asyncio.gather(*(one(i) for i in range(64)))
        finally:
            await carol.close()

    results = asyncio.run(flood())
    denied = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert len(results) - len(denied) == 25  # exactly the limit, never more
    assert len(denied) == 39
    assert all(int(d.response.headers["retry-after"]) >= 1 for d in denied)
    assert all(d.code == "rate_limit_exceeded" for d in denied)
    # The audit trail has every decision: 25 allowed, 39 denied.
    decisions = [
        row["event"]["payload"]["allowed"]
        for i in range(8)
        for row in audit(api, f"flood-{i}", "carol", expect_type="RateLimitChecked")
        if row["type"] == "RateLimitChecked"
    ]
    deadline = time.monotonic() + 30
    while len(decisions) < 64 and time.monotonic() < deadline:
        time.sleep(0.3)
        decisions = [
            row["event"]["payload"]["allowed"]
            for i in range(8)
            for row in audit(api, f"flood-{i}", "carol", expect_type="RateLimitChecked")
            if row["type"] == "RateLimitChecked"
        ]
    assert decisions.count(True) == 25 and decisions.count(False) == 39


def test_a_failing_model_is_retried_circuit_broken_and_fallen_back_and_the_audit_tells_it(
    api: Service,
) -> None:
    completion = client(api, "dave").chat.completions.create(
        model="flaky",
        messages=[{"role": "user", "content": "are you there?"}],
        extra_headers={"X-Context-Id": "fault-story"},
    )
    assert completion.model == "demo-1"  # the fallback chain's next model answered
    rows = audit(api, "fault-story", "dave")
    story = []
    for row in rows:
        p = row["event"]["payload"]
        match row["type"]:
            case "RouteDecided":
                story.append(("route", p["model"], p["reason"], tuple(p["chain"])))
            case "ModelCalled":
                story.append(("call", p["deployment"], p["attempt"], p["outcome"]))
            case "CircuitChanged":
                story.append(("circuit", p["deployment"], p["to_state"]))
            case "ReplyCompleted":
                story.append(("reply", p["model"], p["fallback"]))
            case other:
                story.append((other,))
    assert story == [
        ("ContextCreated",),
        ("InputChecked",),
        ("RateLimitChecked",),
        ("MessageReceived",),
        ("SentimentScored",),
        ("route", "flaky", "requested", ("flaky", "demo-1")),
        ("call", "flaky-a", 1, "network"),
        ("call", "flaky-a", 2, "network"),
        ("call", "flaky-a", 3, "network"),
        ("circuit", "flaky-a", "open"),
        ("call", "demo-1-a", 1, "ok"),
        ("reply", "demo-1", True),  # answered by the chain's fallback, and flagged so
    ]
    assert [r["stream_version"] for r in rows] == list(range(1, len(rows) + 1))


def test_an_openai_compatible_upstream_streaming_and_not(api: Service) -> None:
    # The "loop" model is served by an OpenAI-compatible upstream: chat-llm itself (tenant loop).
    messages: Any = [{"role": "user", "content": "Hello upstream"}]
    whole = client(api).chat.completions.create(model="loop", messages=messages)
    assert whole.model == "loop"
    assert "Hello upstream" in (whole.choices[0].message.content or "")
    extra = whole.model_extra or {}
    assert extra["chatllm"]["deployment"] == "loop-a" and not extra["chatllm"]["fallback"]
    streamed = client(api).chat.completions.create(model="loop", messages=messages, stream=True)
    assert (
        "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        == whole.choices[0].message.content
    )


def test_the_trace_context_flows_from_http_through_the_shard_into_every_event(
    api: Service, collector: Collector
) -> None:
    trace_id, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    client(api).chat.completions.create(
        model="auto",
        messages=[{"role": "user", "content": "trace me"}],
        extra_headers={"X-Context-Id": "traced", "traceparent": f"00-{trace_id}-{caller_span}-01"},
    )
    # Step 1: every event of the turn carries the caller's trace and the shard's turn span.
    rows = audit(api, "traced")
    assert {r["event"]["trace_id"] for r in rows} == {trace_id}
    (turn_span,) = {r["event"]["span_id"] for r in rows}
    # Step 2: both processes exported their spans over OTLP, linked parent to child.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        mine = [s for s in collector.spans if s["trace_id"] == trace_id]
        if {s["service"] for s in mine} >= {"chatllm-api", "chatllm-shard"}:
            break
        time.sleep(0.2)
    server = next(s for s in mine if s["name"] == "POST /v1/chat/completions")
    assert server["service"] == "chatllm-api" and server["parent"] == caller_span
    shard = next(s for s in mine if s["service"] == "chatllm-shard")
    assert shard["name"] == "chat.turn" and shard["span_id"] == turn_span
    # The shard's span hangs under the API's request span, across the process boundary.
    by_id = {s["span_id"]: s for s in mine}
    ancestor = by_id[shard["parent"]]
    while ancestor["span_id"] != server["span_id"]:
        ancestor = by_id[ancestor["parent"]]


def test_fan_out_to_several_models_with_the_openai_sdk(api: Service) -> None:
    messages: Any = [{"role": "user", "content": "Say something about logs."}]
    fanout = {"fanout": ["demo-fast", "demo-large"], "merge": "all"}
    both = client(api).chat.completions.create(model="auto", messages=messages, extra_body=fanout)
    assert len(both.choices) == 2
    assert [c.model_extra["model"] for c in both.choices] == ["demo-fast", "demo-large"]  # type: ignore[index]
    streamed: dict[int, str] = {}
    for chunk in client(api).chat.completions.create(
        model="auto", messages=messages, extra_body=fanout, stream=True
    ):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
    assert streamed == {0: both.choices[0].message.content, 1: both.choices[1].message.content}
    first = client(api).chat.completions.create(
        model="auto", messages=messages, extra_body={**fanout, "merge": "first"}
    )
    assert len(first.choices) == 1 and first.choices[0].message.content in streamed.values()


def test_the_readme_python_example_runs(api: Service, capsys: pytest.CaptureFixture[str]) -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    example = readme.split("```python\n", 1)[1].split("```", 1)[0]
    example = example.replace("http://127.0.0.1:8000/v1", f"{api.base}/v1").replace(
        '"sk-..."', repr(KEYS["alice"])
    )
    exec(compile(example, "README.md", "exec"), {})
    assert "Stream, please" in capsys.readouterr().out


def test_every_openai_parameter_is_honoured_or_refused_by_name(api: Service) -> None:
    """The first table of issue 16, with the official SDK: what is asked is done, or the
    answer is a 400 (404 for a model) that names what cannot be done."""
    c = client(api, "dave")
    ask: Any = [{"role": "user", "content": "Tell me about event logs and replays"}]

    def refused(param: str, **kwargs: Any) -> None:
        with pytest.raises(openai.BadRequestError) as caught:
            c.chat.completions.create(model="demo-1", messages=ask, **kwargs)
        body: Any = caught.value.body
        assert body["param"] == param and param in body["message"], body

    # n: that many choices, each its own answer, whole and streamed.
    two = c.chat.completions.create(model="demo-1", messages=ask, n=2)
    assert [ch.index for ch in two.choices] == [0, 1]
    assert len({ch.message.content for ch in two.choices}) == 2
    assert all(ch.finish_reason == "stop" for ch in two.choices)
    texts = ["", ""]
    for ch in c.chat.completions.create(model="demo-1", messages=ask, n=2, stream=True):
        for part in ch.choices:
            texts[part.index] += part.delta.content or ""
    assert texts == [ch.message.content for ch in two.choices]
    with pytest.raises(openai.BadRequestError, match="'plain' does not support n"):
        c.chat.completions.create(model="plain", messages=ask, n=2)
    refused("n", n=2, extra_body={"fanout": ["demo-1", "demo-fast"]})
    tool: Any = {
        "type": "function",
        "function": {
            "name": "lookup",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
        },
    }
    forced: Any = {"type": "function", "function": {"name": "lookup"}}
    refused(
        "tool_choice", tools=[tool], tool_choice={"type": "function", "function": {"name": "x"}}
    )
    refused("tool_choice", tool_choice="required")  # without tools
    refused("tools", tools=[{"type": "web_search"}])
    with pytest.raises(openai.BadRequestError, match="'plain' does not support tools"):
        c.chat.completions.create(model="plain", messages=ask, tools=[tool], tool_choice=forced)
    # Tools: a forced call comes back as tool_calls, whole and streamed, from the demo model
    # and through an OpenAI-compatible upstream (`loop`); the events keep it; the tool's
    # result sent back gets an answer.
    for model in ("demo-1", "loop"):
        raw = c.chat.completions.with_raw_response.create(
            model=model, messages=ask, tools=[tool], tool_choice=forced
        )
        called = raw.parse().choices[0]
        assert called.finish_reason == "tool_calls" and called.message.content is None, model
        [call] = called.message.tool_calls or []
        assert call.function.name == "lookup" and call.id.startswith("call_")
        assert json.loads(call.function.arguments) == {"query": ask[0]["content"]}
    events = httpx.get(
        f"{api.base}/v1/contexts/{raw.headers['x-context-id']}/events",
        headers={"Authorization": f"Bearer {KEYS['dave']}"},
    ).json()
    reply = next(e["event"]["payload"] for e in events if e["type"] == "ReplyCompleted")
    assert reply["tool_calls"] == [
        {"id": call.id, "name": "lookup", "arguments": call.function.arguments}
    ]
    streamed_call = c.chat.completions.create(
        model="demo-1", messages=ask, tools=[tool], tool_choice="required", stream=True
    )
    deltas = [ch.choices[0] for ch in streamed_call if ch.choices]
    assert deltas[-1].finish_reason == "tool_calls"
    [delta_call] = [tc for d in deltas for tc in (d.delta.tool_calls or [])]
    assert delta_call.function is not None and delta_call.function.name == "lookup"
    history: Any = [
        *ask,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"found": 3}'},
    ]
    answered_tool = c.chat.completions.create(model="demo-1", messages=history, tools=[tool])
    assert answered_tool.choices[0].finish_reason == "stop"
    assert answered_tool.choices[0].message.content
    refused("response_format", response_format={"type": "xml"})
    refused("response_format", response_format={"type": "json_schema"})  # no name, no schema
    with pytest.raises(openai.BadRequestError, match="'plain' does not support json_mode"):
        c.chat.completions.create(
            model="plain", messages=ask, response_format={"type": "json_object"}
        )
    # JSON mode: the demo model answers in JSON, streamed and not; an OpenAI-compatible
    # upstream (`loop`: this same stack) is sent response_format and answers in JSON too.
    as_json = c.chat.completions.create(
        model="demo-1", messages=ask, response_format={"type": "json_object"}
    )
    assert "event logs" in json.loads(as_json.choices[0].message.content or "")["answer"]
    schema = {
        "type": "object",
        "properties": {"title": {"type": "string"}, "words": {"type": "integer"}},
        "required": ["title", "words"],
    }
    shaped: Any = {"type": "json_schema", "json_schema": {"name": "summary", "schema": schema}}
    for model in ("demo-1", "loop"):
        structured = c.chat.completions.create(model=model, messages=ask, response_format=shaped)
        answer = json.loads(structured.choices[0].message.content or "")
        assert set(answer) == {"title", "words"} and isinstance(answer["words"], int), model
    streamed = c.chat.completions.create(
        model="demo-1", messages=ask, response_format=shaped, stream=True
    )
    text_of_stream = "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices)
    assert set(json.loads(text_of_stream)) == {"title", "words"}
    refused("logprobs", logprobs=True, top_logprobs=2)
    for bad, param in [
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -1}, "temperature"),
        ({"presence_penalty": 5}, "presence_penalty"),
        ({"n": 0}, "n"),
    ]:
        refused(param, **bad)
    refused("frobnicate", extra_body={"frobnicate": 1})

    # max_tokens and max_completion_tokens cut the answer, and say so.
    for limit in ({"max_tokens": 1}, {"max_completion_tokens": 1}):
        short = c.chat.completions.create(model="demo-1", messages=ask, **limit)  # type: ignore[call-overload]
        assert short.choices[0].finish_reason == "length"
        assert len((short.choices[0].message.content or "").split()) == 1
    streamed_short = [
        ch.choices[0]
        for ch in c.chat.completions.create(model="demo-1", messages=ask, max_tokens=2, stream=True)
        if ch.choices
    ]
    assert streamed_short[-1].finish_reason == "length"
    assert len("".join(ch.delta.content or "" for ch in streamed_short).split()) == 2
    # stop ends the answer before the first stop sequence.
    whole = c.chat.completions.create(model="demo-1", messages=ask)
    text = whole.choices[0].message.content or ""
    assert "event" in text
    stopped = c.chat.completions.create(model="demo-1", messages=ask, stop=["event"])
    assert stopped.choices[0].message.content == text[: text.index("event")]
    # A usage chunk before [DONE] when asked for.
    chunks = list(
        c.chat.completions.create(
            model="demo-1", messages=ask, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(text.split())
    assert chunks[-2].choices[0].finish_reason == "stop"
    # Content as text parts, and an e-mail address as the user.
    parts: Any = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]
    answered = c.chat.completions.create(
        model="demo-1", messages=[{"role": "user", "content": parts}], user="dave@example.com"
    )
    assert "Hello world" in (answered.choices[0].message.content or "")  # both parts
    # An unknown model is a 404, whether asked for directly or in a fan-out.
    with pytest.raises(openai.NotFoundError, match="gpt-nonexistent-9"):
        c.chat.completions.create(model="gpt-nonexistent-9", messages=ask)
    with pytest.raises(openai.NotFoundError, match="nope"):
        c.chat.completions.create(
            model="demo-1", messages=ask, extra_body={"fanout": ["demo-1", "nope"]}
        )
    # Models: `auto` is listed, and each can be retrieved.
    assert "auto" in {m.id for m in c.models.list()}
    assert c.models.retrieve("demo-1").id == "demo-1"
    # A per-context override naming an unknown model is a 404 when it is set.
    override = httpx.patch(
        f"{api.base}/v1/contexts/dave-override/config",
        json={"overrides": {"model": "gpt-nonexistent-9"}},
        headers={"Authorization": f"Bearer {KEYS['dave']}"},
    )
    assert override.status_code == 404 and override.json()["error"]["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("nope")
