"""The request and response bodies of the API (pydantic), OpenAI's parameters and what
chat-llm does with each, and who a caller is."""

import hashlib
import re
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field

from actors.chat import GenerationOptions
from actors.ports import ChatMessage
from events import (
    ToolCall,
)
from infra.services.rebuild import PROJECTIONS

IDENT = r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$"


ContextId = Annotated[str, Path(pattern=IDENT, description="context id (letters, digits, . _ : -)")]


class Caller(BaseModel):
    tenant_id: str
    user_id: str


AUTO_MODEL = "auto"
"""The model name that lets the router choose (as an empty `model` does)."""


def end_user(user: str | None) -> str | None:
    """OpenAI's `user` as the events' user id: an identifier as it is, anything else (an
    e-mail address, say) as a stable pseudonym, so the log holds no address."""
    if user is None or valid_ident(user):
        return user

    return "u-" + hashlib.sha256(user.encode()).hexdigest()[:32]


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
    400 too. Long as a class: one field per OpenAI parameter, and the checks of each."""

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
    event: dict[str, Any] = Field(description="the event, decoded")
    logged: str = Field(description="the event's bytes exactly as they are on the log (UTF-8)")


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


def valid_ident(value: str) -> bool:
    import re

    return re.fullmatch(IDENT, value) is not None


KeyScopeName = Literal["chat", "ingest", "query", "admin"]
DEFAULT_SCOPES: tuple[KeyScopeName, ...] = ("chat", "query")


class KeyIn(BaseModel):
    """A new API key for the caller's tenant."""

    model_config = ConfigDict(extra="forbid")
    user: str = Field(min_length=1, max_length=256, description="whom its requests are by")
    name: str = Field("", max_length=256)
    scopes: list[KeyScopeName] = Field(default_factory=lambda: [*DEFAULT_SCOPES], min_length=1)
    limit: str = Field("", max_length=256, description='limits notation, e.g. "600/minute"')
    expires_at: datetime | None = Field(None, description="ISO 8601 with a zone")
    expires_in_s: float | None = Field(None, gt=0, description="or: seconds from now")


class RotateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grace_s: float | None = Field(
        None, ge=0, description="how long the old key keeps working (auth.rotation_grace_s)"
    )


class RevokeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field("", max_length=1000)
