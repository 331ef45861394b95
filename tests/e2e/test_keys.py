"""API keys as events, through `chatllm up` with two API processes and auth required: a
key issued with the CLI works on both; revoked, both refuse it within a second, and the
KeyRevoked event is in the audit trail with who revoked it."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from actors.keys import hash_key
from tests.e2e.conftest import Service, cli, start_service, stop_service, wait_for

pytestmark = pytest.mark.e2e

ROOT_KEY = "sk-root-for-the-keys-test"
CONFIG = f"""
[auth]
required = true

[[auth.keys]]
sha256 = "{hash_key(ROOT_KEY)}"
tenant = "acme"
user = "root"
scopes = ["admin", "chat", "query"]
"""
ADMIN = {"Authorization": f"Bearer {ROOT_KEY}"}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    running = start_service(
        tmp_path_factory.mktemp("keys"), CONFIG, extra_env={"CHATLLM_HTTP__WORKERS": "2"}
    )
    try:
        yield running
    finally:
        stop_service(running)


def _turn(base: str, key: str) -> tuple[int, int, dict[str, object]]:
    """One turn on a new connection: (status, the API process that answered, the body)."""
    with httpx.Client() as fresh:
        reply = fresh.post(
            f"{base}/v1/chat/completions",
            json={"model": "auto", "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )
    return reply.status_code, int(reply.headers["x-chatllm-api-process"]), reply.json()


def test_a_key_issued_with_the_cli_works_on_every_api_process(service: Service) -> None:
    made = cli(service, "key", "create", "--user", "alice", "--scope", "chat",
               "--api-key", ROOT_KEY)  # fmt: skip
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("sk-chatllm-") and "shown once" in made.stderr
    served: set[int] = set()
    for _ in range(60):
        status, process, body = _turn(service.base, key)
        assert status == 200, body
        served.add(process)
        if served == {0, 1}:
            break
    assert served == {0, 1}
    listed = cli(service, "key", "list", "--format", "json", "--api-key", ROOT_KEY)
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    alice = [r for r in rows if r["user"] == "alice"]
    assert len(alice) == 1 and alice[0]["status"] == "active" and alice[0]["scopes"] == ["chat"]
    assert alice[0]["last_used_at"] is not None
    # Never the key, nor its hash.
    assert key not in listed.stdout and hash_key(key) not in listed.stdout


def test_a_revoked_key_is_refused_by_both_processes_within_a_second(service: Service) -> None:
    issued = httpx.post(
        f"{service.base}/v1/admin/keys", json={"user": "bob", "scopes": ["chat"]}, headers=ADMIN
    )
    assert issued.status_code == 200, issued.text
    key, key_id = issued.json()["key"], issued.json()["key_id"]
    served: set[int] = set()
    while served != {0, 1}:  # in use through both processes
        status, process, body = _turn(service.base, key)
        assert status == 200, body
        served.add(process)

    revoked = httpx.post(
        f"{service.base}/v1/admin/keys/{key_id}/revoke",
        json={"reason": "left the team"},
        headers=ADMIN,
    )
    assert revoked.status_code == 200, revoked.text
    done = time.monotonic()
    refused_at: dict[int, float] = {}
    accepted_late: list[tuple[int, float]] = []
    while set(refused_at) != {0, 1} and time.monotonic() - done < 10:
        status, process, body = _turn(service.base, key)
        after = time.monotonic() - done
        if status == 200:
            if after > 1.0:
                accepted_late.append((process, after))
            continue
        assert status == 401, body
        assert "revoked" in json.dumps(body) and "left the team" in json.dumps(body)
        refused_at.setdefault(process, after)
    assert set(refused_at) == {0, 1}, refused_at
    assert not accepted_late, f"accepted after more than a second: {accepted_late}"

    # In the audit trail, with who revoked it.
    def logged() -> list[dict[str, object]]:
        found: list[dict[str, object]] = httpx.get(
            f"{service.base}/v1/events", params={"type": "KeyRevoked"}, headers=ADMIN
        ).json()
        return [e for e in found if e["event"]["payload"]["key_id"] == key_id]  # type: ignore[index]

    event = wait_for(logged, "the KeyRevoked event in the audit trail")[0]
    assert event["user_id"] == "root"
    assert event["event"]["payload"] == {  # type: ignore[index]
        "key_id": key_id,
        "revoked_by": "root",
        "reason": "left the team",
    }
