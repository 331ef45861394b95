"""Model providers: the offline demo model and any OpenAI-compatible HTTP API.

The demo model is deterministic: the same conversation always gets the same reply,
so tests, demos and replays are repeatable. It streams word by word, and can be
told to be slow or to fail in a given error class (for tests and fault drills).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import aiohttp

from actors.chat import count_tokens
from actors.ports import ChatMessage, Completion, ModelError, StreamEnd
from actors.router import Deployment
from events import ToolCall

_OPENERS = (
    "Here is a short answer",
    "Thinking about it briefly",
    "In a few words",
    "As far as the demo model can tell",
)


class DemoModel:
    """An offline model: a deterministic reply derived from the conversation."""

    def __init__(
        self,
        name: str = "demo-1",
        latency_ms: float = 0.0,
        faults: Sequence[str] = (),
        down: bool = False,
    ) -> None:
        self.name = name
        self._latency_s = latency_ms / 1000
        self._faults = list(faults)
        self._down = down

    def reply_to(self, messages: Sequence[ChatMessage], choice: int = 0) -> str:
        """The answer; `choice` (one of n) picks another opener for the same conversation."""
        last = next((m.content for m in reversed(messages) if m.role == "user"), "")
        digest = hashlib.sha256("\x1f".join(m.content for m in messages).encode()).digest()
        opener = _OPENERS[(digest[0] + choice) % len(_OPENERS)]
        topic = " ".join(last.split()[:8]) or "(nothing)"
        turn = sum(1 for m in messages if m.role == "user")
        return f"{opener} (turn {turn}): you said \u201c{topic}\u201d."

    def _maybe_fail(self) -> None:
        if self._down:
            raise ModelError("network", f"{self.name} is down")
        if self._faults:
            fault = self._faults.pop(0)
            if fault == "stream_cut":
                self._faults.insert(0, fault)  # raised mid-stream by stream()
                return
            retry_after = 0.05 if fault == "rate_limited" else 0.0
            raise ModelError(fault, f"injected {fault} fault", retry_after_s=retry_after)

    async def stream(
        self, messages: Sequence[ChatMessage], options: Any = None
    ) -> AsyncGenerator[str | StreamEnd, None]:
        if self._latency_s:
            await asyncio.sleep(self._latency_s)
        self._maybe_fail()
        forced = forced_tool(options)
        if forced is not None:
            # A forced tool: a call with arguments filled from the user's words, no text.
            last = next((m.content for m in reversed(messages) if m.role == "user"), "")
            digest = hashlib.sha256("\x1f".join(m.content for m in messages).encode())
            call = ToolCall(
                id=f"call_{digest.hexdigest()[:24]}",
                name=forced["name"],
                arguments=json.dumps(_fill(forced.get("parameters") or {"type": "object"}, last)),
            )
            yield StreamEnd(finish_reason="tool_calls", tool_calls=(call,))
            return
        prefill = ""
        if messages and messages[-1].role == "assistant":
            # Continue the message it is given: the rest of the answer it would have given.
            prefill, messages = messages[-1].content, messages[:-1]
        reply = self.reply_to(messages, getattr(options, "choice", 0))
        shape = getattr(options, "response_format", None) or {}
        if shape.get("type") in ("json_object", "json_schema"):
            reply = json_reply(reply, shape)
        rest = reply[len(prefill) :] if reply.startswith(prefill) else " " + reply
        words = rest.split(" ")
        for i, word in enumerate(words):
            if i == len(words) // 2 and self._faults[:1] == ["stream_cut"]:
                self._faults.pop(0)
                raise ModelError("network", "stream cut mid-answer")
            piece = word if i == 0 else " " + word
            if piece:
                yield piece

    async def complete(self, messages: Sequence[ChatMessage], options: Any = None) -> Completion:
        pieces = [piece async for piece in self.stream(messages, options)]
        content = "".join(p for p in pieces if isinstance(p, str))
        end = next((p for p in pieces if isinstance(p, StreamEnd)), StreamEnd())
        return Completion(
            content=content,
            model=self.name,
            prompt_tokens=sum(count_tokens(m.content) for m in messages),
            completion_tokens=count_tokens(content)
            + sum(count_tokens(c.arguments) for c in end.tool_calls),
            finish_reason=end.finish_reason,
            tool_calls=end.tool_calls,
        )


def forced_tool(options: Any) -> dict[str, Any] | None:
    """The function a request forces (tool_choice "required": the first tool; or one named),
    as its `function` object; None when the model may answer in text."""
    tools = getattr(options, "tools", None) or []
    choice = getattr(options, "tool_choice", None)
    functions = [t.get("function") or {} for t in tools if t.get("type") == "function"]
    if not functions or choice in (None, "auto", "none"):
        return None
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        return next((f for f in functions if f.get("name") == name), None)
    return functions[0]


def json_reply(text: str, response_format: dict[str, Any]) -> str:
    """The demo model's answer in JSON mode: {"answer": text} for json_object; for
    json_schema, an object with every property of the schema, each filled from the answer
    by its type (strings the text, numbers its word count, booleans true), so a client's
    parser and validator can be tried offline."""
    if response_format.get("type") != "json_schema":
        return json.dumps({"answer": text})
    schema = (response_format.get("json_schema") or {}).get("schema") or {}
    return json.dumps(_fill(schema, text))


def _fill(schema: Any, text: str) -> Any:
    if not isinstance(schema, dict):
        return text
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if schema.get("enum"):
        return schema["enum"][0]
    if kind == "object" or "properties" in schema:
        return {name: _fill(sub, text) for name, sub in (schema.get("properties") or {}).items()}
    if kind == "array":
        return [_fill(schema.get("items") or {}, text)]
    if kind in ("integer", "number"):
        return len(text.split())
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return text


def _classify_status(status: int, body: str, retry_after: str | None) -> ModelError:
    text = body[:300]
    if status == 429:
        # Without Retry-After (or an unreadable one): 0, and the service backs off
        # exponentially with jitter instead of waiting a fixed time.
        try:
            seconds = max(0.0, float(retry_after)) if retry_after else 0.0
        except ValueError:
            seconds = 0.0
        return ModelError("rate_limited", f"429 from upstream: {text}", retry_after_s=seconds)
    if status in (400, 413) and (
        "context_length" in body or "maximum context" in body or status == 413
    ):
        return ModelError("context_too_long", f"{status}: {text}")
    if status == 400 and ("content_policy" in body or "content_filter" in body or "safety" in body):
        return ModelError("content_policy", f"{status}: {_reason(body)}")
    if status in (408, 504):
        return ModelError("timeout", f"{status} from upstream")
    if status >= 500:
        return ModelError("network", f"{status} from upstream: {text}")
    if status in (400, 404, 422):
        return ModelError("bad_request", f"{status} from upstream: {_reason(body)}")
    return ModelError("malformed_response", f"unexpected {status}: {text}")


def _reason(body: str) -> str:
    """The message of an OpenAI-style error body (the body itself if it has none)."""
    try:
        error = json.loads(body).get("error") or {}
        message = error.get("message") if isinstance(error, dict) else str(error)
    except (ValueError, AttributeError):
        message = None
    return str(message or body)[:300]


_END_GRACE_S = 1.0
"""After a stream's finish_reason, how long its usage chunk and [DONE] may take."""

_FORWARDED = (
    "max_tokens",
    "stop",
    "temperature",
    "top_p",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "user",
    "reasoning_effort",
    "verbosity",
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "logprobs",
    "top_logprobs",
)
"""GenerationOptions an OpenAI-compatible upstream takes, under the same names."""


class OpenAICompatibleModel:
    """Any OpenAI-compatible chat completions API (OpenAI, vLLM, Ollama, LiteLLM, chat-llm).

    One aiohttp session per deployment (and event loop), its connections kept alive and
    reused across turns. aiohttp rather than httpx: under 64 concurrent turns httpx's pool
    scanned every connection for each request (py-spy: `has_expired` and `get_extra_info`
    were 15% of the shard's CPU, the client as a whole 23%).

    Long as a class: one method per part of OpenAI's protocol (request, whole answer, stream,
    errors), each short."""

    def __init__(self, deployment: Deployment) -> None:
        if not deployment.base_url:
            raise ValueError(f"deployment {deployment.name!r}: provider openai needs base_url")
        self.name = deployment.model
        self._deployment = deployment
        self._model = deployment.upstream_model or deployment.model
        self._url = deployment.base_url.rstrip("/") + "/chat/completions"
        key = os.environ.get(deployment.api_key_env, "") if deployment.api_key_env else ""
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        # Like httpx's timeout: each connect and each read may take this long; a long stream
        # that keeps sending is not cut.
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=deployment.timeout_s, sock_read=deployment.timeout_s
        )
        self._stream_timeout = aiohttp.ClientTimeout(
            total=None, connect=deployment.timeout_s, sock_read=None
        )  # a stream's waits are first_token_timeout_s and stall_timeout_s
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        """The deployment's session, opened in the running loop on first use."""
        loop = asyncio.get_running_loop()
        session = self._session
        if session is None or session.closed or session._loop is not loop:
            session = self._session = aiohttp.ClientSession(
                headers=self._headers, timeout=self._timeout
            )
        return session

    def _body(
        self, messages: Sequence[ChatMessage], stream: bool, options: Any = None
    ) -> dict[str, object]:
        body: dict[str, object] = {
            "model": self._model,
            "messages": [_message(m) for m in messages],
            "stream": stream,
        }
        if options is not None:  # what the caller asked of the generation, as OpenAI names it
            for name in _FORWARDED:
                value = getattr(options, name)
                if value is not None and value != ():
                    body[name] = list(value) if isinstance(value, tuple) else value
            for name, value in (getattr(options, "extra", None) or {}).items():
                if name in self._deployment.extra_params and name not in body:
                    body[name] = value
        return body

    async def stream(
        self, messages: Sequence[ChatMessage], options: Any = None
    ) -> AsyncGenerator[str | StreamEnd, None]:
        """The answer as the upstream streams it, then a StreamEnd with its finish_reason and
        usage. The first token must come within first_token_timeout_s and each next piece
        within stall_timeout_s of the one before (time the caller spends on a piece does
        not count): a hung or stalled upstream is a `timeout`, found in seconds. A stream
        that has said why it ended is whole even if the upstream then keeps the connection
        open without [DONE]: it ends a short grace later."""
        request = self._body(messages, True, options)
        request["stream_options"] = {"include_usage": True}
        deployment = self._deployment
        stall_s = deployment.stall_timeout_s
        loop = asyncio.get_running_loop()
        finish: str | None = None
        usage: dict[str, Any] = {}
        calls = _ToolCallDeltas()
        logprobs: list[dict[str, Any]] = []
        began = False
        try:
            async with asyncio.timeout(deployment.first_token_timeout_s) as deadline:
                async with self._client().post(
                    self._url, json=request, timeout=self._stream_timeout
                ) as response:
                    if response.status != 200:
                        text = (await response.read()).decode(errors="replace")
                        raise _classify_status(
                            response.status, text, response.headers.get("retry-after")
                        )
                    done = False
                    async for raw in response.content:
                        # After [DONE] the body is read to its end, not left: a response
                        # closed half read cannot give its connection back to the pool.
                        if done or not raw.startswith(b"data:"):
                            continue
                        data = raw[5:].strip()
                        if data == b"[DONE]":
                            done = True
                            finish = finish or "stop"  # [DONE] ends it, finish_reason or not
                            continue
                        try:
                            chunk = json.loads(data)
                            if "error" in chunk:
                                raise ModelError(
                                    "network", f"upstream error mid-stream: {chunk['error']}"
                                )
                            if chunk.get("usage"):
                                usage = chunk["usage"]
                            choice = chunk["choices"][0] if chunk["choices"] else {}
                            said = choice.get("delta") or {}
                            delta = said.get("content") or ""
                            logprobs += (choice.get("logprobs") or {}).get("content") or []
                            called = bool(said.get("tool_calls"))
                            if called:
                                calls.add(said["tool_calls"])
                                began = True
                            if choice.get("finish_reason"):
                                finish = str(choice["finish_reason"])
                        except (ValueError, KeyError, IndexError, TypeError) as exc:
                            raise ModelError(
                                "malformed_response", f"bad stream chunk: {exc!r}"
                            ) from None
                        if delta:
                            began = True
                            deadline.reschedule(None)  # the caller's time is not the upstream's
                            yield delta
                        if delta or called or finish is not None:
                            # Once whole, only its usage and [DONE] may follow, and soon.
                            wait = _END_GRACE_S if finish is not None else stall_s
                            deadline.reschedule(loop.time() + wait)
        except TimeoutError:
            if finish is None:
                if began:
                    raise ModelError(
                        "timeout",
                        f"{deployment.name}: the stream stalled: no piece for "
                        f"{deployment.stall_timeout_s:g}s",
                    ) from None
                raise ModelError(
                    "timeout",
                    f"{deployment.name}: no first token within "
                    f"{deployment.first_token_timeout_s:g}s",
                ) from None
        except aiohttp.ClientError as exc:
            if finish is None:
                raise ModelError("network", f"{deployment.name}: {exc!r}") from None
        if finish is None:
            # A body that closed after a finish_reason is a whole answer (some servers send
            # no [DONE]); one that closed before it was cut.
            raise ModelError("network", "stream ended before its finish_reason")
        yield StreamEnd(
            finish_reason=finish,
            prompt_tokens=_int_or_none(usage.get("prompt_tokens")),
            completion_tokens=_int_or_none(usage.get("completion_tokens")),
            tool_calls=calls.whole(),
            logprobs=logprobs or None,
        )

    async def complete(self, messages: Sequence[ChatMessage], options: Any = None) -> Completion:
        request = self._body(messages, False, options)
        try:
            async with self._client().post(self._url, json=request) as response:
                status, raw = response.status, await response.read()
                retry_after = response.headers.get("retry-after")
        except TimeoutError as exc:
            raise ModelError("timeout", f"{self._deployment.name}: {exc!r}") from None
        except aiohttp.ClientError as exc:
            raise ModelError("network", f"{self._deployment.name}: {exc!r}") from None
        if status != 200:
            raise _classify_status(status, raw.decode(errors="replace"), retry_after)
        try:
            data = json.loads(raw)
            content = data["choices"][0]["message"]["content"] or ""
            calls = _tool_calls(data["choices"][0]["message"].get("tool_calls"))
            logprobs = (data["choices"][0].get("logprobs") or {}).get("content")
            usage = data.get("usage") or {}
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise ModelError("malformed_response", f"bad completion: {exc!r}") from None
        return Completion(
            content=content,
            model=self.name,
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", count_tokens(content))),
            finish_reason=data["choices"][0].get("finish_reason") or "stop",
            tool_calls=calls,
            logprobs=logprobs if isinstance(logprobs, list) else None,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _message(m: ChatMessage) -> dict[str, Any]:
    """A message as OpenAI's API takes it, with its tool calls or the call it answers."""
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["content"] = m.content or None
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in m.tool_calls
        ]
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    return out


def _tool_calls(raw: Any) -> tuple[ToolCall, ...]:
    """OpenAI's tool_calls list (whole, from a message) as events.ToolCall."""
    calls: list[ToolCall] = []
    for entry in raw or ():
        function = entry.get("function") or {}
        calls.append(
            ToolCall(
                id=str(entry.get("id") or f"call_{len(calls)}"),
                name=str(function.get("name") or "?"),
                arguments=str(function.get("arguments") or "{}"),
            )
        )
    return tuple(calls)


class _ToolCallDeltas:
    """A stream's tool_calls deltas put together by index: the id and name come once, the
    arguments in fragments."""

    def __init__(self) -> None:
        self.parts: dict[int, dict[str, Any]] = {}

    def add(self, deltas: Any) -> None:
        for delta in deltas:
            part = self.parts.setdefault(int(delta.get("index", 0)), {"arguments": ""})
            if delta.get("id"):
                part["id"] = delta["id"]
            function = delta.get("function") or {}
            if function.get("name"):
                part["name"] = function["name"]
            part["arguments"] += function.get("arguments") or ""

    def whole(self) -> tuple[ToolCall, ...]:
        return _tool_calls(
            {"id": p.get("id"), "function": {"name": p.get("name"), "arguments": p["arguments"]}}
            for _, p in sorted(self.parts.items())
        )


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def provider_for(
    deployment: Deployment, demo_latency_ms: float = 0.0
) -> DemoModel | OpenAICompatibleModel:
    """The provider that serves a deployment (`demo_latency_ms`, model.demo_latency_ms: the
    demo model's latency where the deployment sets none)."""
    if deployment.provider == "openai":
        return OpenAICompatibleModel(deployment)
    return DemoModel(
        name=deployment.model,
        latency_ms=deployment.latency_ms or demo_latency_ms,
        faults=deployment.faults,
        down=deployment.down,
    )
