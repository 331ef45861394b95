"""Who a caller is, with auth on and off (the HTTP layer's rule, against a recording gateway).

Off (the local default) the service is open: an unknown key counts as no key (the OpenAI SDK
always sends one) and a configured key is never held to less than no key at all. On, an
unknown key is a 401 and a key needs the route's scope."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from actors.context import ContextView
from infra.config import load_config
from infra.http.app import build_api
from infra.http.security import hash_key

QUERY_ONLY = "sk-query-only"


class RecordingGateway:
    """Answers a context view and remembers who asked (tenant, user)."""

    models = ("demo-1",)

    def __init__(self) -> None:
        self.callers: list[tuple[str, str]] = []

    async def view(self, meta: Any) -> ContextView:
        self.callers.append((meta.tenant_id, meta.user_id))
        return ContextView(
            context_id=meta.context_id, version=0, title="", model="", messages=0,
            tags=(), config={}, documents=(),
        )  # fmt: skip


def client(required: bool) -> tuple[TestClient, RecordingGateway]:
    keys = [{"sha256": hash_key(QUERY_ONLY), "tenant": "acme", "user": "ann", "scopes": ["query"]}]
    settings = load_config(
        env={}, overrides={"auth.required": required, "auth.keys": keys}
    ).settings
    gateway = RecordingGateway()
    api = build_api(gateway=gateway, store=None, settings=settings, archive_stats=lambda: (0, 0))  # type: ignore[arg-type]
    return TestClient(api), gateway


@pytest.mark.parametrize("key", [None, "sk-...", "sk-anything-at-all"])
def test_auth_off_any_or_no_key_acts_for_the_named_tenant(key: str | None) -> None:
    http, gateway = client(required=False)
    headers = {"X-Tenant-Id": "globex", **({"Authorization": f"Bearer {key}"} if key else {})}
    assert http.get("/v1/contexts/c1", headers=headers).status_code == 200
    assert gateway.callers == [("globex", "anonymous")]


def test_auth_off_a_known_key_names_its_tenant_and_is_not_held_to_its_scopes() -> None:
    http, gateway = client(required=False)
    # GET /v1/contexts/{id} needs `chat`; this key has only `query`. With no key at all the
    # route is open, so the key must not give less.
    answer = http.get(
        "/v1/contexts/c1", headers={"Authorization": f"Bearer {QUERY_ONLY}", "X-Tenant-Id": "x"}
    )
    assert answer.status_code == 200, answer.text
    assert gateway.callers == [("acme", "ann")]


def test_auth_on_unknown_keys_are_401_and_scopes_hold() -> None:
    http, gateway = client(required=True)
    unknown = http.get("/v1/contexts/c1", headers={"Authorization": "Bearer sk-..."})
    assert unknown.status_code == 401 and unknown.json()["error"]["code"] == "invalid_api_key"
    missing = http.get("/v1/contexts/c1")
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
    scoped = http.get("/v1/contexts/c1", headers={"Authorization": f"Bearer {QUERY_ONLY}"})
    assert scoped.status_code == 403 and "'chat' scope" in scoped.json()["error"]["message"]
    assert gateway.callers == []
