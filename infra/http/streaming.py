"""A turn as OpenAI's server-sent events: text, tool calls, log probabilities and usage in
its chunk format; a failure ends the stream with an error event, never [DONE]."""

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import msgspec

from actors.chat import Piece, TurnOutcome
from events import (
    ToolCall,
)
from infra.http.errors import as_http, error_event, outcome_error
from infra.http.schemas import (
    EventRef,
)


def refs(outcome: TurnOutcome) -> list[EventRef]:
    return [
        EventRef(event_id=e.event_id, type=e.type, stream_version=e.stream_version)
        for e in outcome.events
    ]  # the actor returns msgspec refs; the API documents them as a pydantic model


def tool_calls_out(calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
    """Tool calls as OpenAI's API gives them."""
    return [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in calls
    ]


def chunk(
    completion_id: str,
    created: int,
    model: str,
    delta: dict[str, Any],
    finish: str | None,
    index: int = 0,
    logprobs: dict[str, Any] | None = None,
) -> str:
    body = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [
            {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
        ],
    }
    return f"data: {msgspec.json.encode(body).decode()}\n\n"


async def sse(
    first: str | Piece | TurnOutcome,
    items: AsyncIterator[str | Piece | TurnOutcome],
    completion_id: str,
    created: int,
    model: str,
    finished: Callable[[str, str], None],
    include_usage: bool = False,
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format; a failure ends the stream with an error
    event instead of [DONE], so a cut answer is never mistaken for a whole one. Fan-out
    members stream as choices side by side (their `index`). `finished(status, model)` is
    told how the turn ended."""
    shown_model = model or "chat-llm"
    yield chunk(completion_id, created, shown_model, {"role": "assistant", "content": ""}, None)

    async def everything() -> AsyncIterator[str | Piece | TurnOutcome]:
        yield first
        async for item in items:
            yield item

    try:
        async for item in everything():
            if isinstance(item, TurnOutcome):
                finished(item.status, item.model)
                error = outcome_error(item)
                if error is not None:
                    yield error_event(error.message, error.type, error.code)
                    return
                if item.logprobs is not None:  # the answer's, in one chunk before its end
                    yield chunk(
                        completion_id,
                        created,
                        item.model,
                        {},
                        None,
                        logprobs={"content": item.logprobs, "refusal": None},
                    )
                if item.tool_calls:  # whole calls, as one delta (the SDKs put deltas together)
                    calls = [
                        {"index": i, **call}
                        for i, call in enumerate(tool_calls_out(item.tool_calls))
                    ]
                    yield chunk(completion_id, created, item.model, {"tool_calls": calls}, None)
                for index in range(max(len(item.choices), 1)):
                    finish = item.choices[index].finish_reason if item.choices else None
                    why = finish or item.finish_reason
                    yield chunk(completion_id, created, item.model, {}, why, index)
                if include_usage:  # as OpenAI sends it: no choices, the usage
                    usage = {
                        "prompt_tokens": item.prompt_tokens,
                        "completion_tokens": item.completion_tokens,
                        "total_tokens": item.prompt_tokens + item.completion_tokens,
                    }
                    body = {
                        "id": completion_id,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": item.model,
                        "choices": [],
                        "usage": usage,
                    }
                    yield f"data: {msgspec.json.encode(body).decode()}\n\n"
                yield "data: [DONE]\n\n"
                return
            if isinstance(item, Piece):
                yield chunk(
                    completion_id, created, shown_model, {"content": item.text}, None, item.index
                )
            else:
                yield chunk(completion_id, created, shown_model, {"content": item}, None)
        finished("error", "")
        yield error_event("the stream ended without an outcome", "api_error", "stream_failed")
    except Exception as exc:
        finished("error", "")
        failure = as_http(exc)
        yield error_event(getattr(failure, "message", str(failure)), "api_error", "stream_failed")
