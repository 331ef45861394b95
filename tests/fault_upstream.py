"""An OpenAI-compatible upstream that breaks in one way per model name, for the failover
tests (tests/faults/test_failover.py). Run: `python -m tests.fault_upstream PORT`.

Every healthy answer is the same 60 tokens, "tok0 tok1 … tok59", so a test can tell a
whole answer from a cut or doubled one. An assistant message last is a prefill: the answer
continues after the tokens it holds. Usage is reported as OpenAI does (a usage chunk with
`stream_options.include_usage`), with prompt_tokens 7 and the tokens sent.

Timings come from the environment, so the tests have a fast profile and a full one:
FAULT_SLOW_S (slow-first: the first token's delay), FAULT_DOWN_S (flap: how long it is down
from its first request), FAULT_RETRY_AFTER (r429-once's Retry-After).

GET /log lists every request as (model, seconds since the server started, prefill tokens);
POST /reset forgets the log and each model's state.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import sys
import time
from typing import Any

from aiohttp import web

TOKENS = [f"tok{i}" for i in range(60)]
PROMPT_TOKENS = 7

FAULTS = {
    "ok": "healthy; continues an assistant prefill",
    "ok-large": "healthy (a deployment with a larger context window)",
    "ok-small": "healthy (a deployment with the same small context window)",
    "ok-noprefill": "healthy, but refuses an assistant prefill with a 400",
    "r429-once": "429 with Retry-After on its first request, then healthy",
    "r429-always": "429 without Retry-After, always",
    "e500-once": "500 on its first request, then healthy",
    "e503-always": "503, always",
    "reset": "the TCP connection reset before any header",
    "hang": "no response at all",
    "slow-first": "the first token after FAULT_SLOW_S",
    "cut": "the stream closed after 40 of 60 tokens",
    "cut2": "the stream closed after 40 of 60 tokens (its fallback refuses a prefill)",
    "stall": "20 tokens, then nothing with the connection open",
    "malformed": "20 tokens, then one chunk that is not JSON, then the rest",
    "nodone": "a whole answer and usage, then no [DONE], the connection held open",
    "ctx-small": "400 context_length_exceeded",
    "filtered": "400 content_filter with its reason",
    "flap": "503 for FAULT_DOWN_S from its first request, then healthy",
}


class Upstream:
    def __init__(self) -> None:
        self.started = time.monotonic()
        self.log: list[dict[str, Any]] = []
        self.seen: dict[str, int] = {}
        self.first: dict[str, float] = {}

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]


def _logprobs(tokens: list[str], first: int, top: int) -> dict[str, Any] | None:
    """OpenAI's logprobs of `tokens` (the `first`-th token on), when asked (top >= 0):
    token i has log probability -0.01 * (i + 1)."""
    if top < 0:
        return None
    content = []
    for i, token in enumerate(tokens, start=first):
        logprob = round(-0.01 * (i + 1), 4)
        alternatives = [{"token": token, "logprob": logprob, "bytes": None}]
        alternatives += [
            {"token": f"alt{k}", "logprob": logprob - k, "bytes": None} for k in range(1, top)
        ]
        content.append(
            {"token": token, "logprob": logprob, "bytes": None, "top_logprobs": alternatives[:top]}
        )
    return {"content": content, "refusal": None}


async def _tool_call(
    request: web.Request, body: dict[str, Any], model: str, stream: bool
) -> web.StreamResponse:
    """A forced tool: a call to it with {"q": <the last user message>}; streamed, its id and
    name in one delta and its arguments in three fragments, as OpenAI streams them."""
    choice = body["tool_choice"]
    tools = [t["function"]["name"] for t in body["tools"]]
    name = choice["function"]["name"] if isinstance(choice, dict) else tools[0]
    last = next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")
    arguments = json.dumps({"q": last})
    call = {"id": "call_fault1", "type": "function", "function": {"name": name}}
    if not stream:
        whole = {**call, "function": {"name": name, "arguments": arguments}}
        message = {"role": "assistant", "content": None, "tool_calls": [whole]}
        return web.json_response(
            {
                "id": "chatcmpl-fault",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}],
                "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 5,
                          "total_tokens": PROMPT_TOKENS + 5},
            }
        )  # fmt: skip
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(_chunk(model, {"role": "assistant", "tool_calls": [{"index": 0, **call}]}))
    third = len(arguments) // 3
    for part in (arguments[:third], arguments[third : 2 * third], arguments[2 * third :]):
        fragment = {"index": 0, "function": {"arguments": part}}
        await response.write(_chunk(model, {"tool_calls": [fragment]}))
    await response.write(_chunk(model, {}, "tool_calls"))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def _chunk(
    model: str,
    delta: dict[str, Any],
    finish: str | None = None,
    logprobs: dict[str, Any] | None = None,
) -> bytes:
    body = {
        "id": "chatcmpl-fault",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}],
    }
    return f"data: {json.dumps(body)}\n\n".encode()


def _usage(model: str, completion: int) -> bytes:
    body = {
        "id": "chatcmpl-fault",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": {
            "prompt_tokens": PROMPT_TOKENS,
            "completion_tokens": completion,
            "total_tokens": PROMPT_TOKENS + completion,
        },
    }
    return f"data: {json.dumps(body)}\n\n".encode()


def _error(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> Any:
    body = {"error": {"message": message, "type": "invalid_request_error", "code": code}}
    return web.json_response(body, status=status, headers=headers)


def app() -> web.Application:
    state = Upstream()
    slow_s = float(os.environ.get("FAULT_SLOW_S", "20"))
    down_s = float(os.environ.get("FAULT_DOWN_S", "60"))
    retry_after = os.environ.get("FAULT_RETRY_AFTER", "1")

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        model = str(body.get("model", ""))
        messages = body.get("messages") or []
        prefill = 0
        if messages and messages[-1].get("role") == "assistant":
            prefill = len(str(messages[-1].get("content") or "").split())
        now = time.monotonic()
        state.log.append(
            {
                "model": model,
                "t": now - state.started,
                "prefill": prefill,
                "top_k": body.get("top_k"),
            }
        )
        count = state.seen[model] = state.seen.get(model, 0) + 1
        state.first.setdefault(model, now)
        stream = bool(body.get("stream"))
        usage_asked = bool((body.get("stream_options") or {}).get("include_usage"))

        if model not in FAULTS:
            return _error(404, f"The model `{model}` does not exist", "model_not_found")
        if model == "r429-once" and count == 1:
            return _error(429, "Rate limit reached", "rate_limit_exceeded",
                          {"Retry-After": retry_after})  # fmt: skip
        if model == "r429-always":
            return _error(429, "Rate limit reached", "rate_limit_exceeded")
        if model == "e500-once" and count == 1:
            return _error(500, "The server had an error", "server_error")
        if model == "e503-always" or (model == "flap" and now - state.first[model] < down_s):
            return _error(503, "The engine is currently overloaded", "overloaded")
        if model == "reset":
            sock = request.transport.get_extra_info("socket") if request.transport else None
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            if request.transport is not None:
                request.transport.abort()  # RST, before any header
            await asyncio.sleep(3600)
        if model == "hang":
            await asyncio.sleep(3600)
        if model == "ctx-small":
            return _error(
                400,
                "This model's maximum context length is 4096 tokens. However, your messages "
                "resulted in 9000 tokens.",
                "context_length_exceeded",
            )
        if model == "filtered":
            return _error(
                400,
                "The response was filtered due to the prompt triggering the content "
                "management policy (category: violence).",
                "content_filter",
            )
        if model == "ok-noprefill" and prefill:
            return _error(400, "assistant prefill is not supported by this model",
                          "invalid_request_error")  # fmt: skip

        tokens = TOKENS[prefill:]
        top = int(body.get("top_logprobs") or 0) if body.get("logprobs") else -1
        if body.get("tools") and body.get("tool_choice") not in (None, "auto", "none"):
            return await _tool_call(request, body, model, stream)
        if not stream:
            if model in ("cut", "cut2"):
                # Content-Length promises more than is sent: the body is cut.
                headers = {"Content-Length": "4000", "Content-Type": "application/json"}
                response = web.StreamResponse(headers=headers)
                await response.prepare(request)
                await response.write(b'{"id": "chatcmpl-fault", "choices": [{"mess')
                assert request.transport is not None
                request.transport.close()
                return response
            if model == "slow-first":
                await asyncio.sleep(slow_s)
            if model in ("stall",):
                await asyncio.sleep(3600)
            text = " ".join(tokens)
            return web.json_response(
                {
                    "id": "chatcmpl-fault",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "finish_reason": "stop",
                            "logprobs": _logprobs(tokens, prefill, top),
                        }
                    ],
                    "usage": {
                        "prompt_tokens": PROMPT_TOKENS,
                        "completion_tokens": len(tokens),
                        "total_tokens": PROMPT_TOKENS + len(tokens),
                    },
                }
            )

        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(_chunk(model, {"role": "assistant", "content": ""}))
        if model == "slow-first":
            await asyncio.sleep(slow_s)
        for i, token in enumerate(tokens):
            if model in ("cut", "cut2") and i == 40:
                assert request.transport is not None
                request.transport.close()
                return response
            if model == "stall" and i == 20:
                await asyncio.sleep(3600)
            if model == "malformed" and i == 20:
                await response.write(b'data: {"choices": [{"delta": {"content": " to\n\n')
            text = token if i == 0 and not prefill else " " + token
            logprobs = _logprobs([token], prefill + i, top)
            await response.write(_chunk(model, {"content": text}, logprobs=logprobs))
        await response.write(_chunk(model, {}, "stop"))
        if usage_asked:
            await response.write(_usage(model, len(tokens)))
        if model == "nodone":
            await asyncio.sleep(3600)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def log(_: web.Request) -> web.Response:
        return web.json_response(state.log)

    async def reset(_: web.Request) -> web.Response:
        state.reset()
        return web.json_response({"ok": True})

    async def models(_: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": m, "object": "model"} for m in FAULTS]}
        )

    application = web.Application()
    application.router.add_post("/v1/chat/completions", completions)
    application.router.add_get("/v1/models", models)
    application.router.add_get("/log", log)
    application.router.add_post("/reset", reset)
    application.router.add_get("/healthz", models)
    return application


if __name__ == "__main__":
    # Its hung handlers would hold a graceful stop for a minute: a test server stops at once.
    web.run_app(app(), host="127.0.0.1", port=int(sys.argv[1]), print=None, shutdown_timeout=0.5)
