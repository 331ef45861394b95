"""What every route depends on: the API's collaborators, who calls (the caller dependency
with its scope and key-limit checks), and the steps routes share."""

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
from fastapi import Header, Request
from opentelemetry import trace
from pydantic import ValidationError

from actors.chat import ChatRequest, TurnOutcome
from actors.context import (
    CommandRejected,
    ContextCommand,
    RequestMeta,
)
from actors.keys import Key, KeyRing, Refused
from actors.ports import EventSink
from events import (
    ReplyRewritten,
)
from events.standalone import standalone
from infra.adapters.clickhouse.store import AsyncStore
from infra.adapters.clock import SystemClock, new_trace_id, parse_traceparent
from infra.adapters.metrics import Metrics
from infra.adapters.tracing import hex_ids
from infra.config import Settings
from infra.http.errors import OpenAIError, as_http, own_message
from infra.http.queries import TenantPruner
from infra.http.schemas import (
    ASKED_BY,
    AUTO_MODEL,
    IDENT,
    Caller,
    CompletionIn,
)
from infra.http.security import KeyLimits, hash_key, needed_scope
from infra.services.ingest import Ingest
from infra.services.keys import KeyService, config_keys
from infra.services.knowledge import KnowledgeBase
from infra.services.plugins import PluginHost, PluginRequest
from infra.services.workflows import Catalog


async def before_reply(
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


@dataclass
class Api:
    """What the routes share: the API's collaborators (build_api's arguments) and the steps
    more than one route takes (who calls, a turn, a context command, read-your-writes). Long
    as a class of short methods: each is one step a route takes, shared by several."""

    gateway: Any
    store: AsyncStore
    settings: Settings
    archive_stats: Callable[[], tuple[int, int]]
    metrics: Metrics | None = None
    live_counts: Callable[[], Awaitable[dict[str, int]]] | None = None
    prune: TenantPruner | None = None
    ingest: Ingest | None = None
    admin_log: EventSink | None = None
    bootstrap_servers: str = ""
    plugins: PluginHost | None = None
    workflows: Catalog | None = None
    use_profile: Callable[[str, str, str], Awaitable[dict[str, Any]]] | None = None
    knowledge: KnowledgeBase | None = None
    health_report: Callable[[], Awaitable[dict[str, Any]]] | None = None
    settled: Callable[[float], Awaitable[bool]] | None = None
    lag_summary: Callable[[], Awaitable[dict[str, Any]]] | None = None
    more_metrics: Callable[[], Awaitable[bytes]] | None = None
    rebuilds: Any = None
    api_process: int = 0
    clock: SystemClock = field(default_factory=SystemClock)
    keys: KeyService | None = None
    key_limits: KeyLimits = field(default_factory=KeyLimits)
    ring: KeyRing = field(init=False)

    def __post_init__(self) -> None:
        # The key ring the log keeps current (KeyService), or the config's keys alone.
        self.ring = (
            self.keys.ring
            if self.keys is not None
            else KeyRing(config_keys(self.settings.auth.keys))
        )

    async def _key(self, authorization: str) -> Key | None:
        """The known, usable key the header carries; a revoked or expired one is a 401
        that says which (with auth off, it counts as no key, as an unknown one does). A key
        this process does not know yet may have been issued through another API process a
        moment ago: with auth on it is looked up again once the follower has caught up."""
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return None
        if self.keys is not None and self.settings.auth.required:
            await self.keys.ready()  # a process just started folds the keys first
        clock = self.keys.clock if self.keys is not None else self.clock
        digest = hash_key(token.strip())
        found = self.ring.check(digest, clock.now())
        if found is None and self.keys is not None and self.settings.auth.required:
            await self.keys.caught_up()
            found = self.ring.check(digest, clock.now())
        if isinstance(found, Refused):
            if self.settings.auth.required:
                raise OpenAIError(401, found.message, "invalid_request_error", found.code)
            return None
        return found

    async def caller(
        self,  # async: a sync dependency would cost a thread hop per request
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
            key = await self._key(authorization)
            if key is None and self.settings.auth.required:
                raise OpenAIError(
                    401, "invalid API key", "invalid_request_error", "invalid_api_key"
                )
        if key is not None:
            route = request.scope.get("route")
            needed = needed_scope(request.method, getattr(route, "path", request.url.path))
            if self.settings.auth.required and needed not in key.scopes:
                raise OpenAIError(
                    403,
                    f"this API key lacks the {needed!r} scope (it has: {', '.join(key.scopes)})",
                    "permission_error",
                    "insufficient_scope",
                )
            if key.limit:
                wait = self.key_limits.hit(key.key_id, key.limit)
                if wait is not None:
                    raise OpenAIError(
                        429,
                        f"this API key's limit {key.limit} is reached",
                        "rate_limit_error",
                        "key_rate_limited",
                        headers={"Retry-After": str(int(wait + 0.999))},
                    )
            if self.keys is not None:
                self.keys.used(key.key_id)
            return Caller(tenant_id=key.tenant, user_id=key.user)
        if self.settings.auth.required:
            raise OpenAIError(
                401,
                "an API key is required (Authorization: Bearer ...)",
                "invalid_request_error",
                "missing_api_key",
            )
        return Caller(tenant_id=x_tenant_id or self.settings.tenant, user_id="")

    async def with_knowledge(
        self, request: ChatRequest, wanted: bool | None, use_cache: bool
    ) -> ChatRequest:
        """The request with the knowledge-base passages closest to its message attached
        (when asked, or by default with kb.attach), and the caller's cache choice."""
        passages: tuple[Any, ...] = ()
        if self.knowledge is not None and (self.settings.kb.attach if wanted is None else wanted):
            kb = self.settings.kb
            found = await self.knowledge.search(
                request.meta.tenant_id,
                request.messages[-1].content,
                kb.attach_k,
                min_score=kb.min_score,
            )
            passages = tuple(found)
        if not passages and use_cache:
            return request
        return msgspec.structs.replace(request, knowledge=passages, use_cache=use_cache)

    async def run_turn(self, request: ChatRequest) -> TurnOutcome:
        started = time.perf_counter()
        hooked = self.plugins is not None and bool(self.plugins.plugins)
        if hooked:
            assert self.plugins is not None
            request, asked = await before_reply(self.plugins, request)
        try:
            outcome: TurnOutcome = await self.gateway.turn(request)
        except Exception as exc:
            raise as_http(exc) from None
        if hooked and outcome.status == "ok":
            assert self.plugins is not None
            reply, changed_by = await self.plugins.after_reply(asked, outcome.reply)
            if changed_by:
                # What the user receives is what the log says: the change is an event of
                # the context, written by its shard, before the answer goes out.
                rewrite = ReplyRewritten(
                    message_id=outcome.message_id, content=reply, plugins=tuple(changed_by)
                )
                try:
                    await self.gateway.command(ContextCommand(meta=request.meta, rewrite=rewrite))
                except Exception as exc:
                    raise as_http(exc) from None
                outcome = msgspec.structs.replace(outcome, reply=reply)
        self.observe_turn(started, outcome.status, outcome.model)
        return outcome

    def observe_turn(self, started: float, status: str, model: str) -> None:
        """A finished turn, streamed or not, in chatllm_turns_total and chatllm_turn_seconds."""
        if self.metrics is not None:
            self.metrics.turn_seconds.observe(time.perf_counter() - started)
            self.metrics.turns.labels(status=status, model=model or "-").inc()

    def meta_for(
        self, who: Caller, context_id: str, user: str | None, traceparent: str | None = None
    ) -> RequestMeta:
        # The request's span continues the caller's W3C trace; without a tracer provider it
        # is invalid, and the traceparent header is read directly.
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            trace_id, span_id = hex_ids(trace.get_current_span())
        else:  # tracing off: the turn still gets one span id, which all its events carry
            trace_id = parse_traceparent(traceparent) or new_trace_id()
            span_id = self.clock.new_span_id()
        return RequestMeta(
            context_id=context_id,
            tenant_id=who.tenant_id,
            user_id=who.user_id or user or "anonymous",
            trace_id=trace_id,
            span_id=span_id,
            correlation_id=self.clock.new_event_id(),
        )

    def known_models(self) -> list[str]:
        return [AUTO_MODEL, *self.gateway.models]

    def capabilities(self, model: str) -> frozenset[str]:
        """What some deployment of `model` serves (the union over its deployments)."""
        return frozenset().union(
            *(d.capabilities for d in self.settings.deployments if d.model == model)
        )

    def serves(self, model: str, needs: frozenset[str]) -> bool:
        return any(needs <= d.capabilities for d in self.settings.deployments if d.model == model)

    def documented_extras(
        self, raw_body: bytes, exc: ValidationError
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
        deployments = [d for d in self.settings.deployments if d.model == model]
        names = [str(e["loc"][0]) for e in errors]
        if not deployments or not all(n in d.extra_params for n in names for d in deployments):
            raise exc
        extra = {n: data.pop(n) for n in names}
        return CompletionIn.model_validate(data), extra

    def model_not_found(self, name: str, where: str = "model") -> OpenAIError:
        return OpenAIError(
            404,
            f"{where}: the model {name!r} does not exist here; GET /v1/models lists them",
            "invalid_request_error",
            "model_not_found",
        )

    async def run_command(self, command: ContextCommand) -> dict[str, Any]:
        try:
            result = await self.gateway.command(command)
        except CommandRejected as exc:
            own = own_message(exc)
            status = 413 if "the limit is" in own else 400
            raise OpenAIError(status, own, "invalid_request_error", "invalid_command") from None
        except Exception as exc:
            raise as_http(exc) from None
        view: dict[str, Any] = msgspec.to_builtins(result)
        return view

    async def archived_so_far(self) -> None:
        """Read-your-writes on the archive: wait (briefly) until every event acknowledged
        before this request is archived, so a turn just answered shows up in its audit."""
        if self.settled is not None:
            await self.settled(time.time())

    async def record_admin(self, who: Caller, payload: Any) -> None:
        """An operator action, as an event of its own in the log (the audit trail)."""
        if self.admin_log is None:
            return
        event = standalone(
            payload,
            event_id=self.clock.new_event_id(),
            tenant_id=who.tenant_id,
            user_id=who.user_id or "operator",
            occurred_at=datetime.now(UTC),
            stream="admin",
        )
        await self.admin_log.append([event])

    def completion_request(self, raw_body: bytes) -> tuple[CompletionIn, dict[str, Any]]:
        """A chat completion request, checked: every parameter valid, honoured or refused by
        name, every model known and able to serve what is asked; with the parameters beyond
        OpenAI's that the asked model documents. Raises OpenAIError (400, 404) otherwise."""
        extra: dict[str, Any] = {}
        try:
            try:
                body = CompletionIn.model_validate_json(raw_body)
            except ValidationError as exc:
                body, extra = self.documented_extras(raw_body, exc)
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
            if name and name not in self.known_models():
                raise self.model_not_found(name, where)
        needs = body.options().needs()
        for where, name in [("model", body.model), *(("fanout", m) for m in body.fanout)]:
            if name and name != AUTO_MODEL and not self.serves(name, needs):
                missing = sorted(needs - self.capabilities(name))
                raise OpenAIError(
                    400,
                    f"{where}: the model {name!r} does not support {', '.join(missing)} "
                    f"(asked for by {', '.join(ASKED_BY[n] for n in missing)})",
                    "invalid_request_error",
                    "unsupported_parameter",
                    param=ASKED_BY[missing[0]],
                )
        if needs and not any(self.serves(m, needs) for m in self.gateway.models):
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
        return body, extra
