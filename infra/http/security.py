"""Who may call what: the scope every route needs, per-key limits, and the headers every
response carries.

Scopes: `chat` (turns and the caller's own contexts), `query` (projections, the request log,
audit and replay reads), `ingest` (upstream events and the dead letters), `admin` (config,
erasure, rebuilds, knowledge ingestion, memory pruning). A route missing from ROUTE_SCOPES
needs `admin`: new routes are closed until someone decides otherwise (a test checks that
every route is listed).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Literal

from actors.keys import hash_key as hash_key  # re-exported: where the CLI and tests look

Scope = Literal["chat", "ingest", "query", "admin"]
SCOPES: tuple[Scope, ...] = ("chat", "ingest", "query", "admin")

PUBLIC = frozenset(
    {"/healthz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc",
     "/v1/models", "/v1/models/{model_id}", "/dashboard"}
)  # fmt: skip
"""Routes that need no key: liveness, the API's own description (and, with http.docs, its
interactive docs), the model list, and the dashboard's page: a browser's navigation cannot
carry a bearer key, and the page holds no data (every number on it comes from the `query`
routes, with the key typed into it). /metrics needs `query` unless http.metrics_public."""

# One table rather than a scope on each route: closed by default, it is what an operator
# reads to see what a key of each scope may do, and the test walks it against the routes.
ROUTE_SCOPES: dict[tuple[str, str], Scope] = {
    ("POST", "/v1/chat/completions"): "chat",
    ("POST", "/v1/contexts/{context_id}/messages"): "chat",
    ("GET", "/v1/contexts/{context_id}"): "chat",
    ("GET", "/v1/contexts/{context_id}/transcript"): "chat",
    ("POST", "/v1/contexts/{context_id}/documents"): "chat",
    ("DELETE", "/v1/contexts/{context_id}/documents/{document_id}"): "chat",
    ("PUT", "/v1/contexts/{context_id}/tags"): "chat",
    ("PATCH", "/v1/contexts/{context_id}/config"): "chat",
    ("POST", "/v1/contexts/{context_id}/feedback"): "chat",
    ("POST", "/v1/workflows/{name}/runs"): "chat",
    ("GET", "/v1/memory"): "query",
    ("GET", "/v1/memory/stats"): "query",
    ("GET", "/v1/analytics"): "query",
    ("GET", "/v1/analytics/conversations"): "query",
    ("GET", "/v1/analytics/quality"): "query",
    ("GET", "/v1/anomalies"): "query",
    ("GET", "/v1/live"): "query",
    ("POST", "/v1/sql"): "query",
    ("GET", "/metrics"): "query",
    ("GET", "/v1/workflows"): "query",
    ("GET", "/v1/workflows/runs"): "query",
    ("GET", "/v1/workflows/runs/{run_id}"): "query",
    ("GET", "/v1/kb/search"): "query",
    ("GET", "/v1/kb"): "query",
    ("GET", "/v1/audit/verify"): "query",
    ("POST", "/v1/whatif"): "query",
    ("GET", "/v1/events"): "query",
    ("GET", "/v1/contexts/{context_id}/state"): "query",
    ("GET", "/v1/contexts/{context_id}/events"): "query",
    ("POST", "/v1/events"): "ingest",
    ("GET", "/v1/deadletters"): "ingest",
    ("POST", "/v1/deadletters/{partition}/{offset}/retry"): "ingest",
    ("POST", "/v1/memory/prune"): "admin",
    ("POST", "/v1/kb/ingest"): "admin",
    ("POST", "/v1/admin/config"): "admin",
    ("POST", "/v1/admin/forget"): "admin",
    ("POST", "/v1/admin/rebuild"): "admin",
    ("GET", "/v1/admin/rebuild/{job_id}"): "admin",
    ("POST", "/v1/admin/keys"): "admin",
    ("GET", "/v1/admin/keys"): "admin",
    ("POST", "/v1/admin/keys/{key_id}/rotate"): "admin",
    ("POST", "/v1/admin/keys/{key_id}/revoke"): "admin",
}


def needed_scope(method: str, path: str) -> Scope:
    """The scope a route needs (`admin` for a route nobody listed)."""
    return ROUTE_SCOPES.get((method.upper(), path), "admin")


class KeyLimits:
    """Per-key request limits (`auth.keys[].limit`, limits notation: "100/minute"), in this
    API process: a moving window per key."""

    def __init__(self) -> None:
        from limits.storage import MemoryStorage
        from limits.strategies import MovingWindowRateLimiter

        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self._parsed: dict[str, Any] = {}

    def hit(self, key_id: str, limit: str) -> float | None:
        """None if the request may go; else the seconds until it may (Retry-After)."""
        from limits import parse_many

        items = self._parsed.get(limit)
        if items is None:
            items = self._parsed[limit] = parse_many(limit)
        for item in items:
            if not self._limiter.hit(item, "key", key_id):
                reset, _ = self._limiter.get_window_stats(item, "key", key_id)
                import time

                return max(reset - time.time(), 1.0)
        return None


HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
]
API_CSP = (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'")

AsgiScope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Any]]
Send = Callable[[Any], Awaitable[None]]
ASGIApp = Callable[[AsgiScope, Receive, Send], Awaitable[None]]


class _HttpOnly(ABC):
    """A plain ASGI wrapper that acts on HTTP requests (`http`) and passes the rest
    (lifespan, websockets) through untouched."""

    app: ASGIApp

    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.http(scope, receive, send)

    @abstractmethod
    async def http(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        """Handle one HTTP request."""


class SecurityHeaders(_HttpOnly):
    """Adds the security headers to every HTTP response (streamed answers pass through
    untouched), and X-ChatLLM-API-Process: which API process answered (errors included).
    Pages that set their own CSP keep it."""

    def __init__(self, app: ASGIApp, api_process: int = 0) -> None:
        self.app = app
        self.process = (b"x-chatllm-api-process", str(api_process).encode())

    async def http(self, scope: AsgiScope, receive: Receive, send: Send) -> None:

        # The interactive API docs load their scripts and styles: no strict CSP there.
        strict = not scope.get("path", "").startswith(("/docs", "/redoc"))

        async def with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers += [h for h in (*HEADERS, self.process) if h[0] not in present]
                if strict and b"content-security-policy" not in present:
                    headers.append(API_CSP)
                if b"cache-control" not in present:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


class BodyTooLarge(Exception):
    pass


class BodyLimit(_HttpOnly):
    """Refuses a request body over `max_bytes` with 413, by its Content-Length before any
    of it is read, or as soon as a chunked body passes the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def http(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        seen = 0
        started = False

        async def counting() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge
            return message

        async def tracking(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting, tracking)
        except BodyTooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        import json

        message = f"the request body is larger than {self.max_bytes} bytes"
        body = json.dumps(
            {
                "detail": message,
                "error": {"message": message, "type": "invalid_request_error",
                          "param": None, "code": "body_too_large"},
            }
        ).encode()  # fmt: skip
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())],
            }
        )  # fmt: skip
        await send({"type": "http.response.body", "body": body})
