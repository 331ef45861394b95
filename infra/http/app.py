"""The FastAPI app: middleware, the error handlers, and the routes of every area bound to the
API's collaborators. The routes live in routes/ (one module per area), the bodies in
schemas.py, the shared steps and the caller dependency in deps.py.

Each area adds its routes to the app itself rather than through an APIRouter and
include_router: FastAPI 0.165 keeps an included router as one nested route, matched anew per
request, and `app.routes` no longer lists its routes (which the scope table is checked
against)."""

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI

from actors.ports import EventSink
from infra.adapters.clickhouse.store import AsyncStore
from infra.adapters.metrics import Metrics
from infra.config import Settings
from infra.http.deps import Api
from infra.http.errors import install_error_handlers
from infra.http.knowledge import add_knowledge_routes
from infra.http.queries import TenantPruner, add_query_routes
from infra.http.routes import admin, chat, contexts, ops
from infra.http.routes import ingest as ingest_routes
from infra.http.routes import keys as key_routes
from infra.http.routes import log as log_routes
from infra.http.security import BodyLimit, SecurityHeaders
from infra.http.workflows import add_workflow_routes
from infra.services.ingest import Ingest
from infra.services.keys import KeyService
from infra.services.knowledge import KnowledgeBase
from infra.services.plugins import PluginHost
from infra.services.workflows import Catalog


class _App(FastAPI):
    """The app with the security headers outermost, around Starlette's own error middleware
    too: every response, an unexpected 500 included, carries them."""

    def __init__(self, api_process: int, **options: Any) -> None:
        super().__init__(**options)
        self._api_process = api_process

    def build_middleware_stack(self) -> Any:
        return SecurityHeaders(super().build_middleware_stack(), api_process=self._api_process)


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
    keys: KeyService | None = None,
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
    api = _App(
        api_process,
        title="chat-llm",
        version="0.1.0",
        # The interactive docs load their assets from a CDN: only when asked (http.docs).
        docs_url="/docs" if settings.http.docs else None,
        redoc_url="/redoc" if settings.http.docs else None,
        lifespan=_lifespan,
        telemetry={"tracing": traced, "metrics": False, "logs": False},
    )
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
    install_error_handlers(api)
    deps = Api(
        gateway=gateway,
        store=store,
        settings=settings,
        archive_stats=archive_stats,
        metrics=metrics,
        live_counts=live_counts,
        prune=prune,
        ingest=ingest,
        admin_log=admin_log,
        bootstrap_servers=bootstrap_servers,
        plugins=plugins,
        workflows=workflows,
        use_profile=use_profile,
        knowledge=knowledge,
        health_report=health_report,
        settled=settled,
        lag_summary=lag_summary,
        more_metrics=more_metrics,
        rebuilds=rebuilds,
        api_process=api_process,
        keys=keys,
    )
    for area in (ops, chat, contexts):
        area.add_routes(api, deps)
    add_query_routes(
        api,
        deps.caller,
        store,
        metrics=metrics,
        live_counts=live_counts,
        lag_summary=lag_summary,
        prune=prune,
    )
    if workflows is not None:
        add_workflow_routes(api, deps.caller, store, workflows, admin_log)
    if knowledge is not None:
        add_knowledge_routes(api, deps.caller, knowledge)
    for area in (admin, key_routes, ingest_routes, log_routes):
        area.add_routes(api, deps)
    return api
