"""An OpenAI-compatible upstream that answers at once: the provider under the gateway
benchmark, so that what is measured through chat-llm is chat-llm's own cost. A raw ASGI app
on uvicorn (uvloop, httptools) in a process of its own.

`POST /v1/chat/completions`: a fixed completion; with `"stream": true`, TOKENS chunks of
server-sent events and `[DONE]`, as OpenAI sends them, with no wait between them.
`GET /connections`: how many client connections it has seen (each its own client port).

Run as `python -m benchmarks.mock_upstream PORT`.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from benchmarks.common import read_body

TOKENS = 20
_WORDS = [f"word{i} " for i in range(TOKENS)]
_COMPLETION = json.dumps(
    {
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": 0,
        "model": "mock",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(_WORDS)},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 8, "completion_tokens": TOKENS, "total_tokens": 8 + TOKENS},
    }
).encode()
_CHUNKS = [
    b"data: "
    + json.dumps(
        {
            "id": "chatcmpl-mock",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "mock",
            "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}],
        }
    ).encode()
    + b"\n\n"
    for word in _WORDS
]
_DONE = b"data: [DONE]\n\n"
_clients: set[tuple[str, int]] = set()


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = await read_body(receive)
    if scope.get("client"):
        _clients.add(tuple(scope["client"]))
    if scope["path"] == "/connections":
        count = str(len(_clients)).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": count})
        return
    if scope["path"] == "/healthz":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        return
    if b'"stream": true' in body or b'"stream":true' in body:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        for chunk in _CHUNKS:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": _DONE})
        return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": _COMPLETION})


def main(argv: list[str]) -> None:
    import uvicorn

    uvicorn.run(
        app,
        host="127.0.0.1",
        port=int(argv[0]),
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
