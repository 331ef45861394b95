""" "Every response carries" the security headers (README): every route of the app, called
with placeholder parameters and no body, answers, whatever its status, with each header.
And a body over the limit that declares its length is refused before any of it is read."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from fastapi.testclient import TestClient

from infra.config import load_config
from infra.http.app import build_api
from infra.http.security import HEADERS, BodyLimit
from tests.unit.test_auth_modes import RecordingGateway


class Broken:
    """Every collaborator call fails: the answers are errors, and must still carry the
    headers."""

    models = ("demo-1",)

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"{name} is unavailable")


def test_every_route_answers_with_the_security_headers() -> None:
    settings = load_config(env={}).settings
    app = build_api(gateway=RecordingGateway(), store=Broken(), settings=settings,  # type: ignore[arg-type]
                    archive_stats=lambda: (0, 0))  # fmt: skip
    http = TestClient(app, raise_server_exceptions=False)
    checked = 0
    for route in app.routes:
        for method in sorted(getattr(route, "methods", set()) - {"HEAD"}):
            path = re.sub(r"\{[^}]+\}", "x1", route.path)  # type: ignore[attr-defined]
            answer = http.request(method, path)
            for name, value in HEADERS:
                assert answer.headers.get(name.decode()) == value.decode(), (method, path)
            assert "content-security-policy" in answer.headers, (method, path)
            checked += 1
    assert checked >= 35  # every route of build_api without the optional parts


def test_a_declared_oversize_body_is_refused_before_any_of_it_is_read() -> None:
    reads: list[Any] = []
    sent: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()  # an app would read the body: it must never get here

    async def receive() -> dict[str, Any]:
        reads.append(1)
        await asyncio.sleep(3600)  # a client sending slower than anyone waits for
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/events",
             "headers": [(b"content-length", b"10485760")]}  # fmt: skip
    asyncio.run(asyncio.wait_for(BodyLimit(app, max_bytes=1024)(scope, receive, send), 5))
    assert reads == []  # not one chunk was awaited
    assert sent[0]["status"] == 413
