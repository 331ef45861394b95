"""Chat: OpenAI-compatible chat completions (streamed and whole) and the native message route."""

import time
from typing import Annotated, Any

import msgspec
from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse, StreamingResponse

from actors.chat import ChatRequest, TurnOutcome
from actors.ports import ChatMessage
from infra.http.deps import Api
from infra.http.errors import OpenAIError, as_http, outcome_error
from infra.http.schemas import (
    AUTO_MODEL,
    Caller,
    ContextId,
    MessageIn,
    TurnOut,
    end_user,
    valid_ident,
)
from infra.http.streaming import refs, sse, tool_calls_out


def add_routes(app: FastAPI, api: Api) -> None:
    """Add the routes to the app, bound to the API's collaborators."""

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(
        raw: Request,
        who: Annotated[Caller, Depends(api.caller)],
        x_context_id: Annotated[str | None, Header()] = None,
        traceparent: Annotated[str | None, Header()] = None,
    ) -> Any:
        """OpenAI-compatible. Without X-Context-Id every request is a new context holding the
        whole conversation; with it, the context keeps the history and only the last
        message is new."""
        body, extra = api.completion_request(await raw.body())
        if x_context_id is not None and not valid_ident(x_context_id):
            raise OpenAIError(
                400, "invalid X-Context-Id", "invalid_request_error", "invalid_request"
            )
        context_id = x_context_id or api.clock.new_event_id()
        messages = body.chat_messages()
        options = body.options()
        if extra:
            options = msgspec.structs.replace(options, extra=extra)
        request = ChatRequest(
            meta=api.meta_for(who, context_id, end_user(body.user), traceparent),
            messages=messages if x_context_id is None else messages[-1:],
            model="" if body.model == AUTO_MODEL else body.model,
            options=options,
            new_context=x_context_id is None,
            fanout=tuple(body.fanout),
            merge=body.merge,
        )
        request = await api.with_knowledge(request, body.knowledge, body.cache)
        completion_id = f"chatcmpl-{request.meta.correlation_id}"
        created = int(time.time())
        headers = {"X-Context-Id": context_id}
        if body.stream:
            # Wait for the first item: a denial or rejection comes before any text, and must
            # be a proper HTTP error (429, 400), not an error inside a 200 stream.
            started = time.perf_counter()
            items = api.gateway.stream(request).__aiter__()
            try:
                first = await items.__anext__()
            except Exception as exc:
                api.observe_turn(started, "error", "")
                raise as_http(exc) from None
            if isinstance(first, TurnOutcome):
                error = outcome_error(first)
                if error is not None:
                    api.observe_turn(started, first.status, first.model)
                    error.headers.update(headers)
                    raise error
            return StreamingResponse(
                sse(
                    first,
                    items,
                    completion_id,
                    created,
                    body.model,
                    lambda status, model: api.observe_turn(started, status, model),
                    include_usage=bool(body.stream_options and body.stream_options.include_usage),
                ),
                media_type="text/event-stream",
                headers={**headers, "Cache-Control": "no-cache"},
            )
        outcome = await api.run_turn(request)
        error = outcome_error(outcome)
        if error is not None:
            error.headers.update(headers)
            raise error
        return JSONResponse(
            completion_json(outcome, completion_id, created, context_id, api.api_process),
            headers={**headers, "X-Chatllm-Fallback": str(outcome.fallback).lower()},
        )

    @app.post("/v1/contexts/{context_id}/messages", response_model=TurnOut)
    async def send_message(
        context_id: ContextId,
        body: MessageIn,
        who: Annotated[Caller, Depends(api.caller)],
        traceparent: Annotated[str | None, Header()] = None,
    ) -> TurnOut:
        """Send a message to a context (created on its first message); returns the reply."""
        request = ChatRequest(
            meta=api.meta_for(who, context_id, body.user_id, traceparent),
            messages=(ChatMessage(role="user", content=body.content),),
            title=body.title,
            model=body.model or "",
        )
        request = await api.with_knowledge(request, body.knowledge, body.cache)
        outcome = await api.run_turn(request)
        if outcome.status in ("denied", "blocked"):
            error = outcome_error(outcome)
            assert error is not None
            raise error  # in OpenAI's shape, with its type and code
        return TurnOut(
            context_id=outcome.context_id,
            ok=outcome.status == "ok",
            reply=outcome.reply,
            model=outcome.model,
            fallback=outcome.fallback,
            error_class=outcome.error_class,
            message_id=outcome.message_id,
            events=refs(outcome),
        )


def completion_json(
    outcome: TurnOutcome, completion_id: str, created: int, context_id: str, api_process: int
) -> dict[str, Any]:
    """A whole answer as OpenAI's chat.completion object, with chat-llm's own part."""
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": outcome.model,
        "choices": [
            {
                "index": i,
                "message": {
                    "role": "assistant",
                    "content": content or (None if outcome.tool_calls else content),
                    **(
                        {"tool_calls": tool_calls_out(outcome.tool_calls)}
                        if outcome.tool_calls and i == 0
                        else {}
                    ),
                },
                "finish_reason": finish if content or not error else "error",
                "logprobs": (
                    {"content": outcome.logprobs, "refusal": None}
                    if outcome.logprobs is not None and i == 0
                    else None
                ),
                **({"model": model} if outcome.choices else {}),
            }
            for i, (model, content, error, finish) in enumerate(
                [(c.model, c.content, c.error_class, c.finish_reason) for c in outcome.choices]
                or [(outcome.model, outcome.reply, "", outcome.finish_reason)]
            )
        ],
        "usage": {
            "prompt_tokens": outcome.prompt_tokens,
            "completion_tokens": outcome.completion_tokens,
            "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
        },
        "chatllm": {
            "context_id": context_id,
            "message_id": outcome.message_id,
            "deployment": outcome.deployment,
            "fallback": outcome.fallback,
            "events": [r.model_dump() for r in refs(outcome)],
            "api_process": api_process,
        },
    }
