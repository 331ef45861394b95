"""The HTTP API (FastAPI): OpenAI-compatible chat completions, contexts, the audit trail.

OpenAPI at /docs and /openapi.json. OpenAI clients work unchanged with their
base_url pointed at http://host:port/v1; errors use OpenAI's error shape there.
"""

import asyncio
import base64
import binascii
import contextlib
import csv
import hashlib
import io
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec
from fastapi import Depends, FastAPI, Header, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from opentelemetry import trace
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from actors.chat import ChatRequest, GenerationOptions, Piece, TurnOutcome
from actors.context import (
    CommandRejected,
    ContextCommand,
    ContextRejected,
    RequestMeta,
    VersionConflict,
)
from actors.ports import ChatMessage, EventSink
from actors.whatif import WHATIF_TYPES, WhatIfPolicy, whatif
from events import (
    FeedbackGiven,
    ProjectionsRebuilt,
    ReplyRewritten,
    ToolCall,
    UserForgotten,
    decode,
)
from events.standalone import standalone
from infra.adapters.clickhouse.store import ArchivedEvent, AsyncStore, ClickHouseStore, EventFilter
from infra.adapters.clock import SystemClock, new_trace_id, parse_traceparent
from infra.adapters.kafka.clients import LogUnavailable
from infra.adapters.metrics import Metrics
from infra.adapters.tracing import hex_ids
from infra.config import ConfigError, Settings
from infra.http.knowledge import add_knowledge_routes
from infra.http.security import BodyLimit, KeyLimits, SecurityHeaders, needed_scope
from infra.http.workflows import add_workflow_routes
from infra.ray.shardlink import ShardLinkLost
from infra.services.audit import verify
from infra.services.history import UnknownContext, state_at
from infra.services.ingest import Ingest
from infra.services.knowledge import KnowledgeBase
from infra.services.plugins import PluginHost, PluginRequest
from infra.services.queries import QueryError, TenantPruner, add_query_routes, check_moments
from infra.services.rebuild import PROJECTIONS, BrokerSource, RebuildError, RebuildJob
from infra.services.render import CSP, transcript_html
from infra.services.workflows import Catalog

log = logging.getLogger(__name__)

IDENT = r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$"
ContextId = Annotated[str, Path(pattern=IDENT, description="context id (letters, digits, . _ : -)")]


def hash_key(key: str) -> str:
    """How API keys are stored: SHA-256 hex of the key."""
    return hashlib.sha256(key.encode()).hexdigest()


class Caller(BaseModel):
    tenant_id: str
    user_id: str


AUTO_MODEL = "auto"
"""The model name that lets the router choose (as an empty `model` does)."""


def end_user(user: str | None) -> str | None:
    """OpenAI's `user` as the events' user id: an identifier as it is, anything else (an
    e-mail address, say) as a stable pseudonym, so the log holds no address."""
    if user is None or _valid_ident(user):
        return user
    import hashlib

    return "u-" + hashlib.sha256(user.encode()).hexdigest()[:32]


class OpenAIError(Exception):
    """An error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code
        self.headers = headers or {}
        self.param = param


# ---- request and response bodies ---------------------------------------------------


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str = Field(max_length=64)
    text: str | None = Field(default=None, max_length=1_000_000)


class ToolCallIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: dict[str, Any]


class InMessage(BaseModel):
    """One message as OpenAI's API takes it. Content may be a string or a list of parts;
    text parts are joined, other parts (images, audio, files) are refused. An assistant
    message may carry the tool calls it asked for; a `tool` message answers one."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = Field(default=None, max_length=256)
    tool_calls: list[ToolCallIn] | None = Field(default=None, max_length=128)
    tool_call_id: str | None = Field(default=None, min_length=1, max_length=256)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


OPENAI_PARAMETERS: dict[str, str] = {
    "model": "honoured: a listed model, `auto` or empty lets the router choose; else 404",
    "messages": "honoured: text content, as a string or text parts",
    "stream": "honoured",
    "stream_options": "honoured: include_usage sends a usage chunk before [DONE]",
    "max_tokens": "honoured: the reply is cut there, finish_reason length; forwarded",
    "max_completion_tokens": "honoured: as max_tokens",
    "stop": "honoured: up to 4 sequences, the reply ends before the first; forwarded",
    "temperature": "forwarded to the provider (0..2)",
    "top_p": "forwarded to the provider (0..1)",
    "presence_penalty": "forwarded to the provider (-2..2)",
    "frequency_penalty": "forwarded to the provider (-2..2)",
    "seed": "forwarded to the provider",
    "user": "honoured: the end user (a non-identifier is kept as a pseudonym); forwarded",
    "reasoning_effort": "forwarded to the provider",
    "verbosity": "forwarded to the provider",
    "safety_identifier": "forwarded to the provider",
    "prompt_cache_key": "forwarded to the provider",
    "prompt_cache_retention": "forwarded to the provider",
    "prompt_cache_options": "refused",
    "moderation": "refused (chat-llm's sanitizer checks input; see [sanitizer])",
    "n": "honoured: n choices, each its own call down the route (a model that declares n); "
    "not with fanout or tools",
    "tools": "honoured: carried to a model that declares tools (the demo model calls a forced "
    "tool); the calls come back as tool_calls, streamed as a delta, and are in the events",
    "tool_choice": "honoured: none, auto, required or a named function; needs tools",
    "parallel_tool_calls": "forwarded with tools",
    "functions": "refused (deprecated by OpenAI: use tools)",
    "function_call": "refused unless `none` (deprecated by OpenAI: use tool_choice)",
    "response_format": "honoured: json_object and json_schema are carried to a model that "
    "declares json_mode (the demo model answers in JSON); a model without it is a 400",
    "logprobs": "honoured: carried to a model that declares logprobs, and its log "
    "probabilities back (streamed: in the last chunk); a model without them is a 400",
    "top_logprobs": "forwarded with logprobs (0..20)",
    "logit_bias": "refused when not empty",
    "modalities": "refused unless only `text`",
    "audio": "refused",
    "prediction": "refused",
    "web_search_options": "refused",
    "store": "refused when true (every turn is in chat-llm's own log)",
    "metadata": "refused when not empty",
    "service_tier": "refused unless `auto` or `default`",
}
"""Every parameter of OpenAI's chat completions (docs/openai-chat-parameters.txt lists
them) and what chat-llm does with it: nothing is dropped silently."""


ASKED_BY = {
    "json_mode": "response_format",
    "tools": "tools",
    "logprobs": "logprobs",
    "n": "n",
    "vision": "messages",
    "prefill": "messages",
}
"""The request parameter that asks for each deployment capability."""


class CompletionIn(BaseModel):
    """OpenAI's chat completion request. Each parameter is honoured, forwarded to the
    provider, or refused with a 400 that names it (OPENAI_PARAMETERS); an unknown one is a
    400 too."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(default="", max_length=200)
    messages: list[InMessage] = Field(min_length=1, max_length=1000)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    seed: int | None = None
    user: str | None = Field(default=None, min_length=1, max_length=256)
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    safety_identifier: str | None = Field(default=None, max_length=256)
    prompt_cache_key: str | None = Field(default=None, max_length=1024)
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    prompt_cache_options: dict[str, Any] | None = None
    moderation: dict[str, Any] | str | None = None
    n: int | None = Field(default=None, ge=1, le=128)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    logit_bias: dict[str, int] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    fanout: list[str] = Field(
        default_factory=list,
        max_length=8,
        description="chat-llm extension: ask these models at once (OpenAI SDK: extra_body)",
    )
    merge: Literal["first", "all"] = Field(
        default="first", description="fan-out: the first complete answer, or all as choices"
    )
    knowledge: bool | None = Field(
        default=None,
        description="chat-llm extension: attach knowledge-base passages (default: kb.attach)",
    )
    cache: bool = Field(
        default=True, description="chat-llm extension: let the reply cache answer (if enabled)"
    )

    def refusal(self) -> tuple[str, str] | None:
        """(parameter, why) for the first parameter chat-llm cannot honour as sent."""
        checks: list[tuple[str, bool, str]] = [
            (
                "n",
                (self.n or 1) > 1 and (bool(self.fanout) or bool(self.tools)),
                "n > 1 cannot be combined with fanout or tools",
            ),
            ("tools", self._bad_tools() is not None, self._bad_tools() or ""),
            ("tool_choice", self._bad_choice() is not None, self._bad_choice() or ""),
            (
                "tools",
                bool(self.tools) and len(self.fanout) > 1,
                "tools cannot be combined with fanout",
            ),
            ("functions", self.functions is not None, "deprecated by OpenAI: use tools"),
            (
                "function_call",
                self.function_call not in (None, "none"),
                "deprecated by OpenAI: use tool_choice",
            ),
            ("response_format", self._bad_format() is not None, self._bad_format() or ""),
            (
                "top_logprobs",
                self.top_logprobs is not None and not self.logprobs,
                "top_logprobs needs logprobs: true",
            ),
            ("logprobs", bool(self.logprobs) and len(self.fanout) > 1, "not with fanout"),
            ("logit_bias", bool(self.logit_bias), "logit bias is not supported"),
            (
                "modalities",
                self.modalities is not None and set(self.modalities) != {"text"},
                "only text output is supported",
            ),
            ("audio", self.audio is not None, "audio output is not supported"),
            ("prediction", self.prediction is not None, "predicted outputs are not supported"),
            ("web_search_options", self.web_search_options is not None, "not supported"),
            ("prompt_cache_options", self.prompt_cache_options is not None, "not supported"),
            ("moderation", self.moderation is not None, "use chat-llm's [sanitizer] instead"),
            ("store", bool(self.store), "stored completions are not supported"),
            ("metadata", bool(self.metadata), "stored-completion metadata is not supported"),
            (
                "service_tier",
                self.service_tier not in (None, "auto", "default"),
                "service tiers are not supported",
            ),
            (
                "stream_options",
                self.stream_options is not None and not self.stream,
                "stream_options is only allowed with stream: true",
            ),
            (
                "stop",
                isinstance(self.stop, list) and (len(self.stop) > 4 or "" in self.stop),
                "at most 4 non-empty stop sequences",
            ),
        ]
        for i, m in enumerate(self.messages):
            where = f"messages[{i}]"
            if m.role == "function":
                checks.append((where, True, "role 'function' is deprecated by OpenAI: use 'tool'"))
            if m.role == "tool" and not m.tool_call_id:
                checks.append((f"{where}.tool_call_id", True, "a tool message needs it"))
            if m.tool_call_id and m.role != "tool":
                checks.append((f"{where}.tool_call_id", True, "only a tool message has one"))
            if m.tool_calls and m.role != "assistant":
                checks.append((f"{where}.tool_calls", True, "only an assistant message has them"))
            for j, call in enumerate(m.tool_calls or ()):
                if not isinstance(call.function.get("name"), str):
                    checks.append((f"{where}.tool_calls[{j}].function.name", True, "required"))
            extra = sorted(set(m.model_extra or {}))
            if extra:
                checks.append((f"{where}.{extra[0]}", True, "not supported"))
            if isinstance(m.content, list):
                for j, part in enumerate(m.content):
                    if part.type != "text" or part.text is None:
                        checks.append(
                            (
                                f"{where}.content[{j}]",
                                True,
                                f"{part.type!r} parts are not supported",
                            )
                        )
            elif m.content is None and not m.tool_calls:
                checks.append((f"{where}.content", True, "content is required"))
        return next(((name, why) for name, bad, why in checks if bad), None)

    def _bad_tools(self) -> str | None:
        """Why `tools` is not a list of functions as OpenAI takes it (None: it is)."""
        names = []
        for i, tool in enumerate(self.tools or ()):
            function = tool.get("function")
            if tool.get("type") != "function" or not isinstance(function, dict):
                return f"tools[{i}]: only type function is supported"
            name = function.get("name")
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
                return f"tools[{i}].function.name must be 1-64 letters, digits, _ or -"
            if "parameters" in function and not isinstance(function["parameters"], dict):
                return f"tools[{i}].function.parameters must be a JSON Schema object"
            names.append(name)
        if len(set(names)) != len(names):
            return "function names must be unique"
        return None

    def _bad_choice(self) -> str | None:
        """Why `tool_choice` is not one OpenAI takes with these tools (None: it is)."""
        choice = self.tool_choice
        if choice is None:
            return None
        if not self.tools:
            return "tool_choice is only allowed when tools are given"
        if isinstance(choice, str):
            ok = choice in ("none", "auto", "required")
            return None if ok else "must be none, auto, required or a function"
        name = (choice.get("function") or {}).get("name")
        known = {(t.get("function") or {}).get("name") for t in self.tools}
        if choice.get("type") != "function" or name not in known:
            return f"names no function of tools: {name!r}"
        return None

    def _bad_format(self) -> str | None:
        """Why response_format is not one OpenAI takes (None: it is)."""
        shape = self.response_format
        if shape is None:
            return None
        kind = shape.get("type")
        if kind not in ("text", "json_object", "json_schema"):
            return f"type must be text, json_object or json_schema, not {kind!r}"
        if kind == "json_schema":
            spec = shape.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
                return "json_schema needs a json_schema object with a name"
            if "schema" in spec and not isinstance(spec["schema"], dict):
                return "json_schema.schema must be a JSON Schema object"
        return None

    def text_of(self, message: InMessage) -> str:
        if isinstance(message.content, list):
            return "\n".join(part.text or "" for part in message.content)
        return message.content or ""

    def options(self) -> GenerationOptions:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return GenerationOptions(
            max_tokens=self.max_completion_tokens or self.max_tokens,
            stop=tuple(s for s in stop if s),
            temperature=self.temperature,
            top_p=self.top_p,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
            user=self.user,
            reasoning_effort=self.reasoning_effort,
            verbosity=self.verbosity,
            safety_identifier=self.safety_identifier,
            prompt_cache_key=self.prompt_cache_key,
            prompt_cache_retention=self.prompt_cache_retention,
            response_format=(
                self.response_format
                if self.response_format and self.response_format.get("type") != "text"
                else None
            ),
            n=self.n if (self.n or 1) > 1 else None,
            logprobs=self.logprobs or None,
            top_logprobs=self.top_logprobs if self.logprobs else None,
            tools=self.tools or None,
            tool_choice=self.tool_choice if self.tools else None,
            parallel_tool_calls=self.parallel_tool_calls if self.tools else None,
        )

    def chat_messages(self) -> tuple[ChatMessage, ...]:
        """The messages as the model sees them (developer messages are system ones)."""
        return tuple(
            ChatMessage(
                role="system" if m.role == "developer" else m.role,
                content=self.text_of(m),
                tool_calls=tuple(
                    ToolCall(
                        id=c.id,
                        name=str(c.function.get("name")),
                        arguments=str(c.function.get("arguments") or "{}"),
                    )
                    for c in m.tool_calls or ()
                ),
                tool_call_id=m.tool_call_id or "",
            )
            for m in self.messages
        )


class MessageIn(BaseModel):
    content: str = Field(min_length=1, max_length=100_000)
    user_id: str = Field(default="anonymous", pattern=IDENT)
    title: str = Field(default="", max_length=500)
    model: str | None = Field(default=None, max_length=200, description="a model to ask for")
    knowledge: bool | None = Field(
        default=None,
        description="chat-llm extension: attach knowledge-base passages (default: kb.attach)",
    )
    cache: bool = Field(
        default=True, description="chat-llm extension: let the reply cache answer (if enabled)"
    )


class DocumentIn(BaseModel):
    name: str = Field(min_length=1, max_length=255)
    mime_type: str = Field(default="text/plain", pattern=r"^[\w.+-]+/[\w.+-]+$")
    content_base64: str = Field(description="the document's bytes, base64")


class WhatIfIn(BaseModel):
    policy: dict[str, Any] = Field(
        description="sections of the config format: limits, routing, deployments (optional)"
    )
    since: datetime | None = None
    until: datetime | None = None


class ProfileIn(BaseModel):
    profile: str = Field(max_length=64, description="a profile of the config file; empty: none")


class ForgetIn(BaseModel):
    user_id: str = Field(min_length=1, max_length=256)


class RebuildIn(BaseModel):
    projections: list[str] = Field(
        default_factory=lambda: sorted(PROJECTIONS), description="facts, anomalies, prunes"
    )
    since: datetime | None = None
    until: datetime | None = None
    source: Literal["archive", "broker"] = Field(
        "archive", description="the archive (all history) or the broker's log (its retention)"
    )


class FeedbackIn(BaseModel):
    message_id: str = Field(min_length=1, max_length=128, description="the reply's message id")
    thumbs: Literal["up", "down", ""] = ""
    rating: int = Field(0, ge=0, le=5, description="1-5; 0 for none")
    reason: str = Field("", max_length=2000)


class TagsIn(BaseModel):
    tags: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(max_length=100)


class ConfigIn(BaseModel):
    overrides: dict[str, str] = Field(
        description="model, system_prompt; an empty string removes an override"
    )


class EventRef(BaseModel):
    event_id: str
    type: str
    stream_version: int


class TurnOut(BaseModel):
    context_id: str
    ok: bool
    reply: str
    model: str
    fallback: bool = False
    error_class: str = ""
    message_id: str = ""
    """The reply's message id: what POST /v1/contexts/{id}/feedback refers to."""
    events: list[EventRef]


class AuditEvent(BaseModel):
    stream_version: int
    event_id: str
    type: str
    occurred_at: str
    user_id: str
    trace_id: str
    causation_id: str
    event: dict[str, Any] = Field(description="the event exactly as it is on the log")


class ConsumerHealth(BaseModel):
    status: str
    """ok, starting, or stuck."""
    lag: int | None
    busy_s: float
    last_error: str
    reason: str


class Health(BaseModel):
    status: str
    """ok, or degraded when a consumer is stuck (named in `stuck`, with its reason)."""
    archived: int
    dead_lettered: int
    stuck: list[str] = []
    consumers: dict[str, ConsumerHealth] = {}


def _refs(outcome: TurnOutcome) -> list[EventRef]:
    return [
        EventRef(event_id=e.event_id, type=e.type, stream_version=e.stream_version)
        for e in outcome.events
    ]  # the actor returns msgspec refs; the API documents them as a pydantic model


def outcome_error(outcome: TurnOutcome) -> OpenAIError | None:
    """The HTTP error of a turn that did not produce a reply (None if it did)."""
    if outcome.status == "ok":
        return None
    if outcome.status == "denied":
        return OpenAIError(
            429,
            f"{outcome.detail}; retry after {outcome.retry_after_s:g}s",
            "rate_limit_error",
            "rate_limit_exceeded",
            headers={"Retry-After": str(max(1, round(outcome.retry_after_s + 0.499)))},
        )
    if outcome.status == "blocked":
        return OpenAIError(
            400, f"message rejected: {outcome.detail}", "invalid_request_error", "input_rejected"
        )
    if outcome.error_class == "content_policy":
        return OpenAIError(400, outcome.detail, "invalid_request_error", "content_policy_violation")
    if outcome.error_class == "context_too_long":
        return OpenAIError(400, outcome.detail, "invalid_request_error", "context_length_exceeded")
    return OpenAIError(
        502,
        f"the model failed ({outcome.error_class}): {outcome.detail}",
        "api_error",
        outcome.error_class,
    )


async def _before_reply(
    plugins: PluginHost, request: ChatRequest
) -> tuple[ChatRequest, PluginRequest]:
    """The plugins' before_reply on the request's new (last) message."""
    last = request.messages[-1]
    asked = PluginRequest(
        tenant_id=request.meta.tenant_id,
        user_id=request.meta.user_id,
        context_id=request.meta.context_id,
        message=last.content,
    )
    text = await plugins.before_reply(asked)
    if text == last.content:
        return request, asked
    messages = (*request.messages[:-1], msgspec.structs.replace(last, content=text))
    return msgspec.structs.replace(request, messages=messages), asked


def build_api(
    *,
    gateway: Any,
    store: AsyncStore,
    settings: Settings,
    archive_stats: Callable[[], tuple[int, int]],
    metrics: Metrics | None = None,
    lifespan: Callable[[], contextlib.AbstractAsyncContextManager[None]] | None = None,
    live_counts: Callable[[], Awaitable[dict[str, int]]] | None = None,
    prune: TenantPruner | None = None,
    ingest: Ingest | None = None,
    admin_log: EventSink | None = None,
    bootstrap_servers: str = "",
    plugins: PluginHost | None = None,
    workflows: Catalog | None = None,
    use_profile: Callable[[str, str, str], Awaitable[dict[str, Any]]] | None = None,
    knowledge: KnowledgeBase | None = None,
    health_report: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    settled: Callable[[float], Awaitable[bool]] | None = None,
    lag_summary: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    more_metrics: Callable[[], Awaitable[bytes]] | None = None,
    rebuilds: Any = None,
    api_process: int = 0,
) -> FastAPI:
    """The API around a gateway and a store; `lifespan` runs with the server (the projections)."""

    @contextlib.asynccontextmanager
    async def _lifespan(_: FastAPI) -> AsyncIterator[None]:
        if lifespan is None:
            yield
        else:
            async with lifespan():
                yield

    # FastAPI's own OpenTelemetry support makes the server span of each request, continuing
    # the caller's traceparent, once a tracer provider is installed (infra/adapters/tracing.py).
    # Without an OTLP endpoint it is switched off: asking on every request whether a
    # provider is installed cost 3% of the API process's CPU (py-spy).
    traced = bool(settings.tracing.otlp_endpoint)
    api = FastAPI(
        title="chat-llm",
        version="0.1.0",
        lifespan=_lifespan,
        telemetry={"tracing": traced, "metrics": False, "logs": False},
    )
    # Outermost last: every response (errors included) gets the security headers.
    api.add_middleware(BodyLimit, max_bytes=settings.http.max_body_bytes)
    if settings.http.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        api.add_middleware(
            CORSMiddleware,
            allow_origins=settings.http.cors_origins,
            allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
            allow_headers=["authorization", "content-type", "x-tenant-id", "x-context-id"],
            expose_headers=["x-context-id", "retry-after"],
        )
    api.add_middleware(SecurityHeaders)
    clock = SystemClock()
    keys = {k.sha256: k for k in settings.auth.keys}
    key_limits = KeyLimits()

    @api.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        # OpenAI's shape, plus FastAPI's usual `detail` for clients of the non-OpenAI routes.
        error = {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}
        return JSONResponse(
            {"error": error, "detail": exc.message}, exc.status, headers=exc.headers
        )

    @api.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        # Every route answers a bad request in OpenAI's shape (400), never FastAPI's
        # 422 with a list: the first problem names where it is.
        problems = exc.errors()
        first = problems[0] if problems else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = (
            f"invalid request: {where}: {first.get('msg', '')}"
            if where
            else (f"invalid request: {first.get('msg', '')}")
        )
        if len(problems) > 1:
            message += f" (and {len(problems) - 1} more)"
        param = str(first["loc"][-1]) if first.get("loc") else None
        error = {"message": message, "type": "invalid_request_error", "param": param,
                 "code": "invalid_request"}  # fmt: skip
        return JSONResponse({"error": error, "detail": message}, 400)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                429: "rate_limit_error"}.get(exc.status_code)  # fmt: skip
        kind = kind or ("invalid_request_error" if exc.status_code < 500 else "api_error")
        error = {"message": message, "type": kind, "param": None, "code": None}
        return JSONResponse(
            {"error": error, "detail": message}, exc.status_code, headers=exc.headers
        )

    @api.exception_handler(QueryError)
    async def _bad_query(_: Request, exc: QueryError) -> JSONResponse:
        error = {"message": str(exc), "type": "invalid_request_error", "param": None}
        return JSONResponse({"error": {**error, "code": "invalid_query"}, "detail": str(exc)}, 400)

    @api.exception_handler(LogUnavailable)
    async def _log_down(_: Request, exc: LogUnavailable) -> JSONResponse:
        message = f"event log unavailable, nothing was recorded: {exc}"
        return JSONResponse(
            {
                "detail": message,
                "error": {
                    "message": message,
                    "type": "api_error",
                    "param": None,
                    "code": "log_unavailable",
                },
            },
            503,
        )

    async def caller(  # async: a sync dependency would cost a thread hop per request
        request: Request,
        authorization: Annotated[str | None, Header()] = None,
        x_tenant_id: Annotated[str | None, Header(pattern=IDENT)] = None,
    ) -> Caller:
        """Who calls. With auth.required: the API key's tenant and user (the key must hold
        the route's scope and be within its limit). With auth off (the local default) the
        service is open: a known key still names its tenant, user and limit, while an
        unknown key counts as none (the OpenAI SDK always sends one), and then the tenant
        is X-Tenant-Id or the configured one. Off, no caller is held to a scope: a key must
        never give less than no key at all."""
        key = None
        if authorization:
            scheme, _, token = authorization.partition(" ")
            key = keys.get(hash_key(token.strip())) if scheme.lower() == "bearer" else None
            if key is None and settings.auth.required:
                raise OpenAIError(
                    401, "invalid API key", "invalid_request_error", "invalid_api_key"
                )
        if key is not None:
            route = request.scope.get("route")
            needed = needed_scope(request.method, getattr(route, "path", request.url.path))
            if settings.auth.required and needed not in key.scopes:
                raise OpenAIError(
                    403,
                    f"this API key lacks the {needed!r} scope (it has: {', '.join(key.scopes)})",
                    "permission_error",
                    "insufficient_scope",
                )
            if key.limit:
                wait = key_limits.hit(key.sha256, key.limit)
                if wait is not None:
                    raise OpenAIError(
                        429,
                        f"this API key's limit {key.limit} is reached",
                        "rate_limit_error",
                        "key_rate_limited",
                        headers={"Retry-After": str(int(wait + 0.999))},
                    )
            return Caller(tenant_id=key.tenant, user_id=key.user)
        if settings.auth.required:
            raise OpenAIError(
                401,
                "an API key is required (Authorization: Bearer ...)",
                "invalid_request_error",
                "missing_api_key",
            )
        return Caller(tenant_id=x_tenant_id or settings.tenant, user_id="")

    async def with_knowledge(
        request: ChatRequest, wanted: bool | None, use_cache: bool
    ) -> ChatRequest:
        """The request with the knowledge-base passages closest to its message attached
        (when asked, or by default with kb.attach), and the caller's cache choice."""
        passages: tuple[Any, ...] = ()
        if knowledge is not None and (settings.kb.attach if wanted is None else wanted):
            kb = settings.kb
            found = await knowledge.search(
                request.meta.tenant_id,
                request.messages[-1].content,
                kb.attach_k,
                min_score=kb.min_score,
            )
            passages = tuple(found)
        if not passages and use_cache:
            return request
        return msgspec.structs.replace(request, knowledge=passages, use_cache=use_cache)

    async def run_turn(request: ChatRequest) -> TurnOutcome:
        started = time.perf_counter()
        hooked = plugins is not None and bool(plugins.plugins)
        if hooked:
            assert plugins is not None
            request, asked = await _before_reply(plugins, request)
        try:
            outcome: TurnOutcome = await gateway.turn(request)
        except Exception as exc:
            raise _as_http(exc) from None
        if hooked and outcome.status == "ok":
            assert plugins is not None
            reply, changed_by = await plugins.after_reply(asked, outcome.reply)
            if changed_by:
                # What the user receives is what the log says: the change is an event of
                # the context, written by its shard, before the answer goes out.
                rewrite = ReplyRewritten(
                    message_id=outcome.message_id, content=reply, plugins=tuple(changed_by)
                )
                try:
                    await gateway.command(ContextCommand(meta=request.meta, rewrite=rewrite))
                except Exception as exc:
                    raise _as_http(exc) from None
                outcome = msgspec.structs.replace(outcome, reply=reply)
        observe_turn(started, outcome.status, outcome.model)
        return outcome

    def observe_turn(started: float, status: str, model: str) -> None:
        """A finished turn, streamed or not, in chatllm_turns_total and chatllm_turn_seconds."""
        if metrics is not None:
            metrics.turn_seconds.observe(time.perf_counter() - started)
            metrics.turns.labels(status=status, model=model or "-").inc()

    @api.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        """Prometheus text exposition: turns (summed over the API processes), turn latency,
        projection lag, archive counts. X-ChatLLM-API-Process: which process answered."""
        if metrics is None:
            raise HTTPException(404, "metrics are not enabled")
        text = metrics.exposition()
        if more_metrics is not None:  # the projections' own, from the process that runs them
            text += await more_metrics()
        return Response(
            text,
            media_type=CONTENT_TYPE_LATEST,
            headers={"X-ChatLLM-API-Process": str(api_process)},
        )

    def meta_for(
        who: Caller, context_id: str, user: str | None, traceparent: str | None = None
    ) -> RequestMeta:
        # The request's span continues the caller's W3C trace; without a tracer provider it
        # is invalid, and the traceparent header is read directly.
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            trace_id, span_id = hex_ids(trace.get_current_span())
        else:
            trace_id, span_id = parse_traceparent(traceparent) or new_trace_id(), ""
        return RequestMeta(
            context_id=context_id,
            tenant_id=who.tenant_id,
            user_id=who.user_id or user or "anonymous",
            trace_id=trace_id,
            span_id=span_id,
            correlation_id=clock.new_event_id(),
        )

    @api.get("/healthz", response_model=Health)
    async def health() -> Health:
        """Liveness, and every consumer of the log with its lag: `degraded` names the stuck."""
        if health_report is not None:
            return Health.model_validate(await health_report())
        written, dead = archive_stats()
        return Health(status="ok", archived=written, dead_lettered=dead)

    def model_entry(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "chat-llm"}

    def known_models() -> list[str]:
        return [AUTO_MODEL, *gateway.models]

    def capabilities(model: str) -> frozenset[str]:
        """What some deployment of `model` serves (the union over its deployments)."""
        return frozenset().union(
            *(d.capabilities for d in settings.deployments if d.model == model)
        )

    def serves(model: str, needs: frozenset[str]) -> bool:
        return any(needs <= d.capabilities for d in settings.deployments if d.model == model)

    def documented_extras(
        raw_body: bytes, exc: ValidationError
    ) -> tuple[CompletionIn, dict[str, Any]]:
        """The request without the parameters beyond OpenAI's that the asked model's
        deployments all document (Deployment.extra_params), and those parameters; re-raises
        `exc` when any other error is in it or a parameter is documented by none."""
        errors = exc.errors()
        if not all(e["type"] == "extra_forbidden" and len(e["loc"]) == 1 for e in errors):
            raise exc
        try:
            data = json.loads(raw_body)
        except ValueError:
            raise exc from None
        model = data.get("model") if isinstance(data, dict) else None
        deployments = [d for d in settings.deployments if d.model == model]
        names = [str(e["loc"][0]) for e in errors]
        if not deployments or not all(n in d.extra_params for n in names for d in deployments):
            raise exc
        extra = {n: data.pop(n) for n in names}
        return CompletionIn.model_validate(data), extra

    def model_not_found(name: str, where: str = "model") -> OpenAIError:
        return OpenAIError(
            404,
            f"{where}: the model {name!r} does not exist here; GET /v1/models lists them",
            "invalid_request_error",
            "model_not_found",
        )

    @api.get("/v1/models")
    async def models() -> dict[str, Any]:
        """The models the router can send requests to (OpenAI's list shape); `auto` lets the
        router choose."""
        return {"object": "list", "data": [model_entry(m) for m in known_models()]}

    @api.get("/v1/models/{model_id}")
    async def model(model_id: str) -> dict[str, Any]:
        """One model (the OpenAI SDK's models.retrieve)."""
        if model_id not in known_models():
            raise model_not_found(model_id)
        return model_entry(model_id)

    @api.post("/v1/chat/completions", response_model=None)
    async def chat_completions(
        raw: Request,
        who: Annotated[Caller, Depends(caller)],
        x_context_id: Annotated[str | None, Header()] = None,
        traceparent: Annotated[str | None, Header()] = None,
    ) -> Any:
        """OpenAI-compatible. Without X-Context-Id every request is a new context holding the
        whole conversation; with it, the context keeps the history and only the last
        message is new."""
        raw_body = await raw.body()
        extra: dict[str, Any] = {}
        try:
            try:
                body = CompletionIn.model_validate_json(raw_body)
            except ValidationError as exc:
                body, extra = documented_extras(raw_body, exc)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            if first["type"] == "extra_forbidden":
                raise OpenAIError(
                    400,
                    f"unrecognized request argument supplied: {where}",
                    "invalid_request_error",
                    "unknown_parameter",
                    param=where,
                ) from None
            raise OpenAIError(
                400,
                f"invalid request: {where}: {first['msg']}",
                "invalid_request_error",
                "invalid_request",
                param=where,
            ) from None
        refused = body.refusal()
        if refused is not None:
            name, why = refused
            raise OpenAIError(
                400, f"{name}: {why}", "invalid_request_error", "unsupported_parameter",
                param=name,
            )  # fmt: skip
        for where, name in [("model", body.model), *(("fanout", m) for m in body.fanout)]:
            if name and name not in known_models():
                raise model_not_found(name, where)
        needs = body.options().needs()
        for where, name in [("model", body.model), *(("fanout", m) for m in body.fanout)]:
            if name and name != AUTO_MODEL and not serves(name, needs):
                missing = sorted(needs - capabilities(name))
                raise OpenAIError(
                    400,
                    f"{where}: the model {name!r} does not support {', '.join(missing)} "
                    f"(asked for by {', '.join(ASKED_BY[n] for n in missing)})",
                    "invalid_request_error",
                    "unsupported_parameter",
                    param=ASKED_BY[missing[0]],
                )
        if needs and not any(serves(m, needs) for m in gateway.models):
            raise OpenAIError(
                400,
                f"no model here supports {', '.join(sorted(needs))}",
                "invalid_request_error",
                "unsupported_parameter",
                param=ASKED_BY[sorted(needs)[0]],
            )
        if body.messages[-1].role not in ("user", "tool"):
            raise OpenAIError(
                400,
                "the last message must have role 'user' (or 'tool', a tool's result)",
                "invalid_request_error",
                "invalid_request",
            )
        if x_context_id is not None and not _valid_ident(x_context_id):
            raise OpenAIError(
                400, "invalid X-Context-Id", "invalid_request_error", "invalid_request"
            )
        context_id = x_context_id or clock.new_event_id()
        messages = body.chat_messages()
        options = body.options()
        if extra:
            options = msgspec.structs.replace(options, extra=extra)
        request = ChatRequest(
            meta=meta_for(who, context_id, end_user(body.user), traceparent),
            messages=messages if x_context_id is None else messages[-1:],
            model="" if body.model == AUTO_MODEL else body.model,
            options=options,
            new_context=x_context_id is None,
            fanout=tuple(body.fanout),
            merge=body.merge,
        )
        request = await with_knowledge(request, body.knowledge, body.cache)
        completion_id = f"chatcmpl-{request.meta.correlation_id}"
        created = int(time.time())
        headers = {"X-Context-Id": context_id}
        if body.stream:
            # Wait for the first item: a denial or rejection comes before any text, and must
            # be a proper HTTP error (429, 400), not an error inside a 200 stream.
            started = time.perf_counter()
            items = gateway.stream(request).__aiter__()
            try:
                first = await items.__anext__()
            except Exception as exc:
                observe_turn(started, "error", "")
                raise _as_http(exc) from None
            if isinstance(first, TurnOutcome):
                error = outcome_error(first)
                if error is not None:
                    observe_turn(started, first.status, first.model)
                    error.headers.update(headers)
                    raise error
            return StreamingResponse(
                _sse(
                    first,
                    items,
                    completion_id,
                    created,
                    body.model,
                    lambda status, model: observe_turn(started, status, model),
                    include_usage=bool(body.stream_options and body.stream_options.include_usage),
                ),
                media_type="text/event-stream",
                headers={**headers, "Cache-Control": "no-cache"},
            )
        outcome = await run_turn(request)
        error = outcome_error(outcome)
        if error is not None:
            error.headers.update(headers)
            raise error
        return JSONResponse(
            {
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
                                {"tool_calls": _tool_calls_out(outcome.tool_calls)}
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
                        [
                            (c.model, c.content, c.error_class, c.finish_reason)
                            for c in outcome.choices
                        ]
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
                    "events": [r.model_dump() for r in _refs(outcome)],
                    "api_process": api_process,
                },
            },
            headers={**headers, "X-Chatllm-Fallback": str(outcome.fallback).lower()},
        )

    @api.post("/v1/contexts/{context_id}/messages", response_model=TurnOut)
    async def send_message(
        context_id: ContextId,
        body: MessageIn,
        who: Annotated[Caller, Depends(caller)],
        traceparent: Annotated[str | None, Header()] = None,
    ) -> TurnOut:
        """Send a message to a context (created on its first message); returns the reply."""
        request = ChatRequest(
            meta=meta_for(who, context_id, body.user_id, traceparent),
            messages=(ChatMessage(role="user", content=body.content),),
            title=body.title,
            model=body.model or "",
        )
        request = await with_knowledge(request, body.knowledge, body.cache)
        outcome = await run_turn(request)
        if outcome.status in ("denied", "blocked"):
            error = outcome_error(outcome)
            assert error is not None
            raise HTTPException(error.status, error.message, headers=error.headers)
        return TurnOut(
            context_id=outcome.context_id,
            ok=outcome.status == "ok",
            reply=outcome.reply,
            model=outcome.model,
            fallback=outcome.fallback,
            error_class=outcome.error_class,
            message_id=outcome.message_id,
            events=_refs(outcome),
        )

    async def run_command(command: ContextCommand) -> dict[str, Any]:
        try:
            result = await gateway.command(command)
        except CommandRejected as exc:
            own = _own(exc)
            status = 413 if "the limit is" in own else 400
            raise OpenAIError(status, own, "invalid_request_error", "invalid_command") from None
        except Exception as exc:
            raise _as_http(exc) from None
        view: dict[str, Any] = msgspec.to_builtins(result)
        return view

    @api.get("/v1/contexts/{context_id}")
    async def get_context(
        context_id: ContextId, who: Annotated[Caller, Depends(caller)]
    ) -> dict[str, Any]:
        """The context's state: tags, overrides, documents (without their bytes), counts."""
        try:
            result = await gateway.view(meta_for(who, context_id, None, None))
        except Exception as exc:
            raise _as_http(exc) from None
        view: dict[str, Any] = msgspec.to_builtins(result)
        return view

    @api.get("/v1/contexts/{context_id}/transcript", response_class=HTMLResponse)
    async def transcript(
        context_id: ContextId, who: Annotated[Caller, Depends(caller)]
    ) -> HTMLResponse:
        """The conversation as an HTML page: every message shown as text, never as markup."""
        try:
            messages = await gateway.conversation(meta_for(who, context_id, None, None))
        except Exception as exc:
            raise _as_http(exc) from None
        return HTMLResponse(
            transcript_html(context_id, messages),
            headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"},
        )

    @api.post("/v1/contexts/{context_id}/documents")
    async def attach_document(
        context_id: ContextId, body: DocumentIn, who: Annotated[Caller, Depends(caller)]
    ) -> dict[str, Any]:
        """Attach a document (size-limited); text documents are given to the model."""
        try:
            content = base64.b64decode(body.content_base64, validate=True)
        except (binascii.Error, ValueError):
            raise OpenAIError(
                400,
                "content_base64 is not valid base64",
                "invalid_request_error",
                "invalid_request",
            ) from None
        meta = meta_for(who, context_id, None, None)
        return await run_command(
            ContextCommand(meta=meta, attach=(body.name, body.mime_type, content))
        )

    @api.delete("/v1/contexts/{context_id}/documents/{document_id}")
    async def remove_document(
        context_id: ContextId, document_id: str, who: Annotated[Caller, Depends(caller)]
    ) -> dict[str, Any]:
        meta = meta_for(who, context_id, None, None)
        return await run_command(ContextCommand(meta=meta, remove_document=document_id))

    @api.put("/v1/contexts/{context_id}/tags")
    async def set_tags(
        context_id: ContextId, body: TagsIn, who: Annotated[Caller, Depends(caller)]
    ) -> dict[str, Any]:
        """Replace the context's tags (the event records what was added and removed)."""
        meta = meta_for(who, context_id, None, None)
        return await run_command(ContextCommand(meta=meta, set_tags=tuple(body.tags)))

    @api.patch("/v1/contexts/{context_id}/config")
    async def configure(
        context_id: ContextId, body: ConfigIn, who: Annotated[Caller, Depends(caller)]
    ) -> dict[str, Any]:
        """Per-context overrides: model, system_prompt. An unknown model is a 404, now, not
        a silent reroute at the next turn."""
        model = body.overrides.get("model")
        if model and model != AUTO_MODEL and model not in known_models():
            raise model_not_found(model, "overrides.model")
        meta = meta_for(who, context_id, None, None)
        return await run_command(ContextCommand(meta=meta, configure=body.overrides))

    @api.post("/v1/contexts/{context_id}/feedback")
    async def give_feedback(
        context_id: ContextId, body: FeedbackIn, who: Annotated[Caller, Depends(caller)]
    ) -> dict[str, Any]:
        """Thumbs up/down and/or a 1-5 rating of one reply (its message_id is in the
        `chatllm.events` of the reply, or in the context's messages)."""
        meta = meta_for(who, context_id, None, None)
        feedback = FeedbackGiven(
            message_id=body.message_id, thumbs=body.thumbs, rating=body.rating, reason=body.reason
        )
        return await run_command(ContextCommand(meta=meta, feedback=feedback))

    add_query_routes(
        api,
        caller,
        store,
        metrics=metrics,
        live_counts=live_counts,
        lag_summary=lag_summary,
        prune=prune,
    )

    if workflows is not None:
        add_workflow_routes(api, caller, store, workflows, admin_log)
    if knowledge is not None:
        add_knowledge_routes(api, caller, knowledge)

    async def archived_so_far() -> None:
        """Read-your-writes on the archive: wait (briefly) until every event acknowledged
        before this request is archived, so a turn just answered shows up in its audit."""
        if settled is not None:
            await settled(time.time())

    @api.get("/v1/audit/verify", tags=["audit"])
    async def audit_verify(
        who: Annotated[Caller, Depends(caller)],
        context: Annotated[str, Query(max_length=256, description="one stream only")] = "",
    ) -> Any:
        """Check the caller's tenant's archived streams against their hash chains: every
        altered, removed or reordered event is named (`ok` is false then)."""
        await archived_so_far()
        return await store.call_with(lambda s: verify(s, who.tenant_id, context))

    async def record_admin(who: Caller, payload: Any) -> None:
        """An operator action, as an event of its own in the log (the audit trail)."""
        if admin_log is None:
            return
        event = standalone(
            payload,
            event_id=clock.new_event_id(),
            tenant_id=who.tenant_id,
            user_id=who.user_id or "operator",
            occurred_at=datetime.now(UTC),
            stream="admin",
        )
        await admin_log.append([event])

    @api.post("/v1/admin/config", tags=["admin"])
    async def switch_config(body: ProfileIn, who: Annotated[Caller, Depends(caller)]) -> Any:
        """Switch the running service to another profile of its config file (empty: the
        file alone). Live keys take effect now; the answer lists those that need a restart.
        The change is recorded as a ConfigChanged event (who, before, after)."""
        if use_profile is None:
            raise HTTPException(503, "this service cannot switch its configuration")
        try:
            return await use_profile(body.profile, who.tenant_id, who.user_id or "operator")
        except ConfigError as exc:
            raise HTTPException(422, str(exc)) from None

    @api.post("/v1/admin/forget", tags=["admin"])
    async def forget_user(body: ForgetIn, who: Annotated[Caller, Depends(caller)]) -> Any:
        """Erase a user's content from the archive and every projection of the caller's
        tenant (a data-protection request). The audit chain still verifies; the erasure is
        itself recorded as a UserForgotten event."""
        erased = await store.call("forget_user", who.tenant_id, body.user_id)
        # The live state too: the shard's contexts (transcripts, titles) and its cache.
        try:
            await gateway.forget(who.tenant_id, body.user_id)
        except Exception as exc:
            raise _as_http(exc) from None
        await record_admin(
            who,
            UserForgotten(
                user_id=body.user_id, events=erased, requested_by=who.user_id or "operator"
            ),
        )
        return {"user_id": body.user_id, "erased_events": erased}

    @api.post("/v1/whatif", tags=["replay"])
    async def what_if(body: WhatIfIn, who: Annotated[Caller, Depends(caller)]) -> Any:
        """Re-run the caller's tenant's recorded requests under another policy (limits,
        routing, deployments with prices) without calling any model; recorded and
        counterfactual side by side. Deterministic."""
        check_moments(body.since, body.until)
        try:
            policy = msgspec.convert(body.policy, WhatIfPolicy)
        except msgspec.ValidationError as exc:
            raise QueryError(f"invalid policy: {exc}") from None
        if not policy.deployments:
            policy = msgspec.structs.replace(policy, deployments=list(settings.deployments))
        if problems := policy.problems():
            raise QueryError("invalid policy: " + "; ".join(problems))
        where = EventFilter(
            tenant_id=who.tenant_id, types=WHATIF_TYPES, since=body.since, until=body.until
        )
        events = [decode(r.body.encode()) async for page in store.search(where) for r in page]
        report = whatif(events, policy, settings.deployments)
        empty = {"requests": 0}
        return report.get(who.tenant_id, {"recorded": empty, "whatif": empty, "changed": {}})

    background: set[asyncio.Task[None]] = set()
    local_rebuilds: dict[str, RebuildJob] = {}

    async def rebuild_call(method: str, *args: Any) -> Any:
        """Rebuilds run where the store is: in the store host (an actor) when there is one,
        else in this process."""
        if rebuilds is not None:
            try:
                return await getattr(rebuilds, method).remote(*args)
            except Exception as exc:
                cause = getattr(exc, "cause", None)
                raise (cause if isinstance(cause, Exception) else exc) from None
        if method == "rebuild_status":
            job = local_rebuilds.get(args[0])
            return None if job is None else job.status()
        if any(job.state == "running" for job in local_rebuilds.values()):
            raise RuntimeError("a rebuild is already running")
        projections, since, until, source = args
        job = RebuildJob(
            lambda: ClickHouseStore(settings.clickhouse).open(),
            projections,
            since,
            until,
            source=source,
            broker=BrokerSource(bootstrap_servers, settings.topics.events)
            if bootstrap_servers
            else None,
        ).start()
        local_rebuilds[job.job_id] = job
        return job.status()

    @api.post("/v1/admin/rebuild", tags=["admin"])
    async def start_rebuild(body: RebuildIn, who: Annotated[Caller, Depends(caller)]) -> Any:
        """Rebuild projections from the archive into shadow tables and swap them in
        atomically; the service keeps serving. Returns a job to poll (one at a time)."""
        check_moments(body.since, body.until)
        try:
            status = await rebuild_call(
                "rebuild_start", list(body.projections), body.since, body.until, body.source
            )
        except RebuildError as exc:
            raise QueryError(str(exc)) from None
        except RuntimeError as exc:
            raise HTTPException(409, str(exc)) from None
        job_id = status["job_id"]

        async def record_when_done() -> None:
            while True:
                found = await rebuild_call("rebuild_status", job_id)
                if found is None or found["state"] != "running":
                    break
                await asyncio.sleep(0.5)
            if found is not None and found["report"] is not None:
                await record_admin(
                    who,
                    ProjectionsRebuilt(
                        projections=tuple(body.projections),
                        events=found["report"]["events"],
                        since=body.since,
                        until=body.until,
                        requested_by=who.user_id or "operator",
                    ),
                )

        background.add(task := asyncio.create_task(record_when_done()))
        task.add_done_callback(background.discard)
        return JSONResponse(status, 202)

    @api.get("/v1/admin/rebuild/{job_id}", tags=["admin"])
    async def rebuild_status(job_id: str, who: Annotated[Caller, Depends(caller)]) -> Any:
        """A rebuild's progress: done/total events, rate, ETA, and its report when done."""
        found = await rebuild_call("rebuild_status", job_id)
        if found is None:
            raise HTTPException(404, f"no rebuild {job_id!r}")
        return found

    def ingesting() -> Ingest:
        if ingest is None:
            raise HTTPException(503, "ingest is not configured in this process")
        return ingest

    @api.post("/v1/events", tags=["ingest"])
    async def ingest_events(raw: Request, who: Annotated[Caller, Depends(caller)]) -> Any:
        """Ingest upstream events (the JSON envelope of docs/events.schema.json): a JSON array,
        or JSON lines (application/x-ndjson). Each is checked now; valid ones are queued on
        the ingest topic and appended to the log by the projection worker, the others go to
        the dead-letter topic and are listed in `rejected` with the reason. An event_id sent
        twice is stored once. 422 when none is valid."""
        body = await raw.body()
        # Each event's own bytes, untouched: a rejected one is dead-lettered as it was sent.
        items: list[bytes]
        if "ndjson" in raw.headers.get("content-type", ""):
            items = [line.strip() for line in body.splitlines() if line.strip()]
        else:
            try:
                items = [bytes(r) for r in msgspec.json.decode(body, type=list[msgspec.Raw])]
            except msgspec.DecodeError as exc:
                raise QueryError(
                    f"the body must be a JSON array of events (or JSON lines): {exc}"
                ) from None
        if len(items) > settings.ingest.max_batch:
            raise QueryError(
                f"{len(items)} events in one batch; the limit is {settings.ingest.max_batch}"
            )
        limit = settings.broker.max_record_bytes
        oversized = [i for i, item in enumerate(items) if len(item) > limit]
        if oversized:
            # Never a 503: retrying cannot make it fit. Nothing of the batch was taken.
            raise OpenAIError(
                413,
                f"event {oversized[0]} is {len(items[oversized[0]])} bytes; the log accepts at"
                f" most {limit} bytes per event (broker.max_record_bytes); nothing was accepted",
                "invalid_request_error",
                "event_too_large",
            )
        result = await ingesting().submit(items, who.tenant_id)
        status = 422 if items and not result.accepted else 200
        return JSONResponse(msgspec.to_builtins(result), status)

    @api.get("/v1/deadletters", tags=["ingest"])
    async def dead_letters(who: Annotated[Caller, Depends(caller)]) -> Any:
        """The dead-letter topic: records that failed validation, with the reason, naming
        the caller's tenant (and, without required API keys, those naming none)."""
        found = await ingesting().list(who.tenant_id, include_unowned=not settings.auth.required)
        return JSONResponse(msgspec.to_builtins(found))

    @api.post("/v1/deadletters/{partition}/{offset}/retry", tags=["ingest"])
    async def retry_dead_letter(
        partition: int, offset: int, who: Annotated[Caller, Depends(caller)]
    ) -> Any:
        """Re-drive one dead letter through ingest (after fixing what it depended on)."""
        try:
            result = await ingesting().retry(
                who.tenant_id, partition, offset, include_unowned=not settings.auth.required
            )
        except LookupError as exc:
            raise HTTPException(404, str(exc)) from None
        return JSONResponse(msgspec.to_builtins(result), 422 if not result.accepted else 200)

    @api.get("/v1/events", response_model=None)
    async def search_events(
        who: Annotated[Caller, Depends(caller)],
        type_: Annotated[list[str] | None, Query(alias="type", description="event types")] = None,
        since: Annotated[datetime | None, Query(description="from (inclusive), ISO 8601")] = None,
        until: Annotated[datetime | None, Query(description="to (exclusive), ISO 8601")] = None,
        user: Annotated[str, Query(max_length=256)] = "",
        context: Annotated[str, Query(max_length=256)] = "",
        model: Annotated[str, Query(max_length=256)] = "",
        q: Annotated[str, Query(max_length=1000, description="text anywhere in the event")] = "",
        format_: Annotated[Literal["json", "jsonl", "csv"], Query(alias="format")] = "json",
        limit: Annotated[int | None, Query(ge=1, le=10_000_000)] = None,
    ) -> Any:
        """The request log: the caller's tenant's archived events, filtered, in time order.
        `json` answers up to `limit` (default 100) events; `jsonl` (the events exactly as
        logged) and `csv` stream any number with flat memory."""
        try:
            check_moments(since, until)
        except QueryError as exc:
            raise OpenAIError(400, str(exc), "invalid_request_error", "invalid_query") from None
        where = EventFilter(
            tenant_id=who.tenant_id,
            types=tuple(type_ or ()),
            since=since,
            until=until,
            user_id=user,
            context_id=context,
            model=model,
            text=q,
        )
        await archived_so_far()
        if format_ == "json":
            found = [
                {**_logged(e), "event": msgspec.json.decode(e.body)}
                async for page in store.search(where, limit or 100)
                for e in page
            ]
            return JSONResponse(found)
        media = "application/x-ndjson" if format_ == "jsonl" else "text/csv"
        return StreamingResponse(_export(store, where, limit, format_), media_type=media)

    @api.get("/v1/contexts/{context_id}/state", response_model=None)
    async def context_state_at(
        context_id: ContextId,
        who: Annotated[Caller, Depends(caller)],
        at: Annotated[datetime, Query(description="the moment, ISO 8601 with a zone")],
    ) -> Any:
        """Time travel: the context (messages, documents, tags, config) and the limiter and
        router state that applied to it, exactly as they were at `at`, from events alone."""
        check_moments(at)
        await archived_so_far()
        try:
            moment = await state_at(store, who.tenant_id, context_id, at)
        except UnknownContext as exc:
            raise HTTPException(404, str(exc)) from None
        return JSONResponse(msgspec.to_builtins(moment))

    @api.get("/v1/contexts/{context_id}/events", response_model=list[AuditEvent])
    async def context_events(
        context_id: ContextId, who: Annotated[Caller, Depends(caller)]
    ) -> list[AuditEvent]:
        """The context's archived events in stream order (the audit trail)."""
        await archived_so_far()
        records = await store.stream_events(who.tenant_id, context_id)
        return [
            AuditEvent(
                stream_version=r.stream_version,
                event_id=r.event_id,
                type=r.type,
                occurred_at=r.occurred_at.isoformat(),
                user_id=r.user_id,
                trace_id=r.trace_id,
                causation_id=r.causation_id,
                event=msgspec.json.decode(r.body),
            )
            for r in records
        ]

    return api


CSV_COLUMNS = (
    "occurred_at",
    "type",
    "stream_id",
    "stream_version",
    "user_id",
    "event_id",
    "trace_id",
)


def _logged(event: ArchivedEvent) -> dict[str, Any]:
    return {
        "occurred_at": event.occurred_at.isoformat(),
        "type": event.type,
        "stream_id": event.stream_id,
        "stream_version": event.stream_version,
        "user_id": event.user_id,
        "event_id": event.event_id,
        "trace_id": event.trace_id,
    }


async def _export(
    store: AsyncStore, where: EventFilter, limit: int | None, format_: str
) -> AsyncIterator[bytes]:
    """Page by page: the response never holds more than one page of the archive."""
    if format_ == "csv":
        yield (",".join(CSV_COLUMNS) + "\r\n").encode()
    async for page in store.search(where, limit):
        if format_ == "jsonl":
            yield b"".join(e.body.encode() + b"\n" for e in page)
        else:
            buffer = io.StringIO()
            writer = csv.writer(buffer)
            for event in page:
                row = _logged(event)
                writer.writerow([row[c] for c in CSV_COLUMNS])
            yield buffer.getvalue().encode()


def _valid_ident(value: str) -> bool:
    import re

    return re.fullmatch(IDENT, value) is not None


def _own(exc: Exception) -> str:
    """A domain error's own message (Ray's re-raised copy prints its traceback instead)."""
    return str(getattr(exc, "cause", None) or exc)


def _as_http(exc: Exception) -> Exception:
    """Domain errors from the actor (Ray re-raises them as themselves) to HTTP errors. The
    message is the domain error's own: never Ray's traceback (pids, addresses, code)."""
    own = _own(exc)
    if isinstance(exc, ContextRejected):
        return OpenAIError(403, own, "permission_error", "context_forbidden")
    if isinstance(exc, VersionConflict):
        return OpenAIError(
            409, f"concurrent writer on this context: {own}", "api_error", "version_conflict"
        )
    cause = exc if isinstance(exc, LogUnavailable) else getattr(exc, "cause", None)
    if isinstance(cause, LogUnavailable):
        return cause
    if isinstance(exc, ShardLinkLost) or type(exc).__name__ in (
        "ActorDiedError",
        "ActorUnavailableError",
        "RayActorError",
    ):
        log.warning("chat shard stopped during a request: %s", type(exc).__name__)
        return OpenAIError(
            503,
            "the chat shard stopped during the request (Ray restarts it). A turn is recorded"
            " completely or not at all: check the context's events before retrying.",
            "api_error",
            "shard_restarting",
            headers={"Retry-After": "2"},
        )
    log.error("chat turn failed: %r", exc)
    return OpenAIError(
        503, f"the chat shard failed: {type(exc).__name__}", "api_error", "shard_unavailable"
    )


def _tool_calls_out(calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
    """Tool calls as OpenAI's API gives them."""
    return [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in calls
    ]


def _chunk(
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


async def _sse(
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
    yield _chunk(completion_id, created, shown_model, {"role": "assistant", "content": ""}, None)

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
                    yield _error_event(error.message, error.type, error.code)
                    return
                if item.logprobs is not None:  # the answer's, in one chunk before its end
                    yield _chunk(
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
                        for i, call in enumerate(_tool_calls_out(item.tool_calls))
                    ]
                    yield _chunk(completion_id, created, item.model, {"tool_calls": calls}, None)
                for index in range(max(len(item.choices), 1)):
                    finish = item.choices[index].finish_reason if item.choices else None
                    why = finish or item.finish_reason
                    yield _chunk(completion_id, created, item.model, {}, why, index)
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
                yield _chunk(
                    completion_id, created, shown_model, {"content": item.text}, None, item.index
                )
            else:
                yield _chunk(completion_id, created, shown_model, {"content": item}, None)
        finished("error", "")
        yield _error_event("the stream ended without an outcome", "api_error", "stream_failed")
    except Exception as exc:
        finished("error", "")
        failure = _as_http(exc)
        yield _error_event(getattr(failure, "message", str(failure)), "api_error", "stream_failed")


def _error_event(message: str, type_: str, code: str | None) -> str:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return f"data: {msgspec.json.encode(body).decode()}\n\n"
