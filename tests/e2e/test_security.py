"""Security against the running service: a key of tenant A reads nothing of tenant B through
any read route; scopes and per-key limits hold; responses carry security headers, CORS is
off; oversize bodies are refused; keys never show up in the log, the archive or responses."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from infra.http.security import ROUTE_SCOPES, hash_key
from tests.e2e.conftest import Service, cli, start_service, stop_service, wait_for

pytestmark = pytest.mark.e2e

KEYS = {
    "alice": ("sk-sec-alice-0001", "acme", ["chat", "query", "ingest", "admin"], ""),
    "bob": ("sk-sec-bob-0002", "beta", ["chat", "query", "ingest", "admin"], ""),
    "chatter": ("sk-sec-chatter-0003", "acme", ["chat"], ""),
    "limited": ("sk-sec-limited-0004", "acme", ["chat", "query"], "3/minute"),
}
SECRET = "BETA-SECRET-7f3a"
CONFIG = """
[auth]
required = true

[limits]
rate_per_s = 0
""" + "".join(
    f'[[auth.keys]]\nsha256 = "{hash_key(k)}"\ntenant = "{t}"\nuser = "{u}"\n'
    f"scopes = {json.dumps(s)}\nlimit = {json.dumps(lim)}\n\n"
    for u, (k, t, s, lim) in KEYS.items()
)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    service = start_service(tmp_path_factory.mktemp("security"), config=CONFIG)
    try:
        yield service
    finally:
        stop_service(service)


def call(service: Service, who: str, method: str, path: str, **kw: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEYS[who][0]}", **kw.pop("headers", {})}
    return httpx.request(method, f"{service.base}{path}", headers=headers, timeout=60, **kw)


@pytest.fixture(scope="module")
def beta_data(running: Service) -> dict[str, str]:
    """Tenant beta's secrets: a turn, a document and feedback, archived."""
    turn = call(running, "bob", "POST", "/v1/contexts/beta-ctx/messages",
                json={"content": f"my password is {SECRET}"})  # fmt: skip
    assert turn.status_code == 200, turn.text
    document = base64.b64encode(f"notes: {SECRET}".encode()).decode()
    attached = call(running, "bob", "POST", "/v1/contexts/beta-ctx/documents",
                    json={"name": "n.txt", "content_base64": document})  # fmt: skip
    assert attached.status_code == 200, attached.text
    message_id = turn.json()["message_id"]
    call(running, "bob", "POST", "/v1/contexts/beta-ctx/feedback",
         json={"message_id": message_id, "thumbs": "up"})  # fmt: skip
    wait_for(
        lambda: len(call(running, "bob", "GET", "/v1/contexts/beta-ctx/events").json()) >= 10,
        "beta's events in the archive",
    )
    return {"context": "beta-ctx", "message_id": message_id}


# Every read route, asked by alice (tenant acme) for beta's things.
def read_requests(beta: dict[str, str]) -> list[tuple[str, str, dict[str, Any]]]:
    ctx, q = beta["context"], {"q": SECRET}
    return [
        ("GET", f"/v1/contexts/{ctx}", {}),
        ("GET", f"/v1/contexts/{ctx}/transcript", {}),
        ("GET", f"/v1/contexts/{ctx}/events", {}),
        ("GET", f"/v1/contexts/{ctx}/state", {"params": {"at": "2100-01-01T00:00:00Z"}}),
        ("GET", "/v1/memory", {"params": {"context": ctx}}),
        ("GET", "/v1/memory/stats", {}),
        ("GET", "/v1/analytics", {}),
        ("GET", "/v1/analytics/conversations", {}),
        ("GET", "/v1/analytics/quality", {}),
        ("GET", "/v1/anomalies", {}),
        ("GET", "/v1/live", {}),
        ("GET", "/v1/events", {"params": {**q, "context": ctx, "format": "jsonl"}}),
        ("GET", "/v1/events", {"params": {"format": "csv"}}),
        ("GET", "/v1/audit/verify", {"params": {"context": ctx}}),
        ("GET", "/v1/workflows", {}),
        ("GET", "/v1/workflows/runs", {}),
        ("GET", f"/v1/workflows/runs/{uuid.uuid4()}", {}),
        ("GET", "/v1/kb", {}),
        ("GET", "/v1/kb/search", {"params": q}),
        ("GET", "/v1/deadletters", {}),
        ("GET", f"/v1/admin/rebuild/{uuid.uuid4().hex}", {}),
        ("GET", "/v1/admin/keys", {}),
        ("GET", "/metrics", {}),
        ("POST", "/v1/whatif", {"json": {"policy": {}}}),
        ("POST", "/v1/sql", {"json": {"query": "SELECT text FROM chatllm.facts"}}),
    ]


def test_a_key_of_one_tenant_reads_nothing_of_another(
    running: Service, beta_data: dict[str, str]
) -> None:
    asked = read_requests(beta_data)
    # Every read route of the API is in the list (a new one must be added here).
    listed = {(m, p) for m, p in ROUTE_SCOPES if m == "GET" or p in ("/v1/whatif", "/v1/sql")}
    covered = {
        (m, p) for m, p in listed
        if any(m == am and _matches(p, ap) for am, ap, _ in asked)
    }  # fmt: skip
    assert covered == listed, f"read routes not tried: {sorted(listed - covered)}"
    for method, path, kw in asked:
        response = call(running, "alice", method, path, **kw)
        assert response.status_code < 500, (path, response.status_code, response.text)
        # Nothing of beta's, and no internals (a Ray traceback names pids and addresses).
        assert SECRET not in response.text and "ray::" not in response.text, (path, response.text)
    # And the owner does see it, route by route (so the reads above would have found it):
    # every route that shows text shows beta's secret to beta. The others show numbers
    # only, and say so here.
    blind = []
    for method, path, kw in asked:
        owned = call(running, "bob", method, path, **kw)
        if (method, path.split("?")[0]) in NUMBERS_ONLY or _numbers_only(path):
            continue
        if kw.get("params", {}).get("format") == "csv":
            continue  # the request log's CSV: envelope columns only (times, types, ids)
        if SECRET not in owned.text:
            blind.append((path, owned.status_code, owned.text[:200]))
    assert blind == [], blind
    # The CLI's export, with alice's key: nothing of beta.
    exported = cli(running, "audit", "--context", "beta-ctx", "--format", "json",
                   "--api-key", KEYS["alice"][0])  # fmt: skip
    assert SECRET not in exported.stdout
    # Writing into beta's context with alice's key is refused.
    hijack = call(running, "alice", "POST", "/v1/contexts/beta-ctx/messages", json={"content": "x"})
    assert hijack.status_code == 403


# Routes that answer with numbers, ids and states only: no text of the tenant's to leak.
NUMBERS_ONLY_PREFIXES = (
    "/v1/memory/stats", "/v1/analytics", "/v1/live", "/v1/audit/verify", "/v1/workflows",
    "/v1/kb", "/v1/deadletters", "/v1/admin/rebuild/", "/v1/admin/keys", "/metrics",
    "/v1/whatif", "/v1/anomalies",
)  # fmt: skip
NUMBERS_ONLY: set[tuple[str, str]] = {
    ("GET", "/v1/contexts/beta-ctx"),  # the context's view: counts, ids, digests
    # This stack has no knowledge sources (kb.sources), so no passage of beta's exists to
    # plant the secret in: the search is tried for alice above, but proves nothing here.
    ("GET", "/v1/kb/search"),
}


def _numbers_only(path: str) -> bool:
    return path.startswith(NUMBERS_ONLY_PREFIXES) and not path.startswith("/v1/kb/search")


def _matches(template: str, path: str) -> bool:
    parts, actual = template.split("/"), path.split("/")
    return len(parts) == len(actual) and all(
        p.startswith("{") or p == a for p, a in zip(parts, actual, strict=True)
    )


def test_scopes_and_per_key_limits(running: Service) -> None:
    assert call(running, "chatter", "POST", "/v1/contexts/acme-1/messages",
                json={"content": "hi"}).status_code == 200  # fmt: skip
    denied = call(running, "chatter", "GET", "/v1/memory")
    assert denied.status_code == 403 and "'query' scope" in denied.json()["error"]["message"]
    assert call(running, "chatter", "POST", "/v1/admin/forget",
                json={"user_id": "x"}).status_code == 403  # fmt: skip
    assert call(running, "alice", "POST", "/v1/events", content=b"").status_code != 403
    # Every listed route is reachable only with its scope: one without it is refused.
    for (method, path), scope in ROUTE_SCOPES.items():
        if scope == "chat" or method != "GET":
            continue
        concrete = path.replace("{context_id}", "acme-1").replace("{run_id}", str(uuid.uuid4()))
        concrete = concrete.replace("{job_id}", "x")
        assert call(running, "chatter", method, concrete).status_code == 403, path
    codes = [call(running, "limited", "GET", "/v1/memory/stats").status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    limited = call(running, "limited", "GET", "/v1/memory/stats")
    assert int(limited.headers["Retry-After"]) >= 1


def test_headers_cors_and_oversize_bodies(running: Service) -> None:
    response = call(running, "alice", "GET", "/v1/memory/stats",
                    headers={"Origin": "https://evil.example"})  # fmt: skip
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    assert "default-src 'none'" in response.headers["content-security-policy"]
    assert response.headers["cache-control"] == "no-store"
    assert "access-control-allow-origin" not in response.headers  # CORS is off
    # With auth on, /metrics needs a key with `query`; the interactive docs are off
    # (they would load a CDN's scripts) unless http.docs; the public routes answer.
    assert httpx.get(f"{running.base}/metrics", timeout=30).status_code == 401
    assert call(running, "chatter", "GET", "/metrics").status_code == 403
    assert call(running, "alice", "GET", "/metrics").status_code == 200
    for off in ("/docs", "/redoc"):
        assert httpx.get(f"{running.base}{off}", timeout=30).status_code == 404
    for public in ("/healthz", "/openapi.json", "/v1/models", "/dashboard"):
        assert httpx.get(f"{running.base}{public}", timeout=30).status_code == 200, public
    page = httpx.get(f"{running.base}/dashboard", timeout=30)
    assert "nonce-" in page.headers["content-security-policy"]  # its own CSP is kept
    assert page.headers["x-frame-options"] == "DENY"
    json_type = {"Content-Type": "application/json"}
    big = call(running, "alice", "POST", "/v1/contexts/acme-2/messages",
               content=b"x" * (9 * 1024 * 1024), headers=json_type)  # fmt: skip
    assert big.status_code == 413 and "larger than" in big.json()["error"]["message"]
    for bad in (b'{"content": "\xff\xfe"}', b"[" * 10_000 + b"]" * 10_000, b'{"content": 1}'):
        answer = call(running, "alice", "POST", "/v1/contexts/acme-2/messages", content=bad,
                      headers=json_type)  # fmt: skip
        assert 400 <= answer.status_code < 500 and answer.json().get("detail"), answer.text


def test_keys_never_show_up_in_the_log_the_archive_or_answers(
    running: Service, beta_data: dict[str, str]
) -> None:
    log = running.log()
    for key, _, _, _ in KEYS.values():
        assert key not in log
        for who in ("alice", "bob"):
            found = call(running, who, "GET", "/v1/events", params={"q": key, "format": "jsonl"})
            assert found.status_code == 200 and found.text.strip() == ""
    config = cli(running, "config", "show", "--format", "json")
    assert not any(key in config.stdout for key, _, _, _ in KEYS.values())
