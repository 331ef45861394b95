"""Every error of the native routes is in OpenAI's shape ({"error": {message, type, param,
code}}), like the chat completions route's: validation errors and a denied turn's 429 too
(issue 23, item 9)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from actors.chat import TurnOutcome
from infra.config import load_config
from infra.http.app import build_api
from tests.unit.test_auth_modes import RecordingGateway


class DenyingGateway(RecordingGateway):
    """Every turn is denied by the rate limiter."""

    async def turn(self, request: Any) -> TurnOutcome:
        return TurnOutcome(status="denied", context_id=request.meta.context_id,
                           detail="user limit 1/minute reached", retry_after_s=12.0)  # fmt: skip


def client() -> TestClient:
    settings = load_config(env={}).settings
    api = build_api(gateway=DenyingGateway(), store=None, settings=settings,  # type: ignore[arg-type]
                    archive_stats=lambda: (0, 0))  # fmt: skip
    return TestClient(api)


def openai_shaped(body: dict[str, Any]) -> bool:
    error = body.get("error")
    return isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    ("method", "path", "kw", "param"),
    [
        ("POST", "/v1/contexts/c1/feedback", {"json": {"message_id": "m", "rating": 9}}, "rating"),
        ("POST", "/v1/contexts/c1/messages", {"json": {}}, "content"),
        ("PUT", "/v1/contexts/c1/tags", {"json": {"tags": "x"}}, "tags"),
        ("GET", "/v1/events", {"params": {"format": "xml"}}, "format"),
    ],
)
def test_validation_errors_are_400_in_openai_shape_naming_the_param(
    method: str, path: str, kw: dict[str, Any], param: str
) -> None:
    answer = client().request(method, path, **kw)
    assert answer.status_code == 400, answer.text
    body = answer.json()
    assert openai_shaped(body), body
    assert body["error"]["param"] == param and body["error"]["type"] == "invalid_request_error"


def test_a_denied_turn_on_the_native_route_is_a_429_in_openai_shape() -> None:
    answer = client().post("/v1/contexts/c1/messages", json={"content": "hi"})
    assert answer.status_code == 429, answer.text
    assert openai_shaped(answer.json()), answer.text
    assert answer.json()["error"]["code"] == "rate_limit_exceeded"
    assert answer.headers["retry-after"] == "12"
