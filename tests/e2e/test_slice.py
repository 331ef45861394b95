"""The slice end to end, as a user runs it: `chatllm up`, `chatllm chat`, `chatllm audit`."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import CHATLLM, Service, cli, wait_for

pytestmark = pytest.mark.e2e


def test_chat_turns_reach_the_audit_trail_exactly_once_in_order(service: Service) -> None:
    contexts = [f"e2e-ctx-{i}" for i in range(4)]
    returned: dict[str, list[dict[str, Any]]] = {c: [] for c in contexts}

    # Step 1: one turn through the CLI, as a user types it.
    result = cli(service, "chat", "hello from the command line", "--context", contexts[0])
    assert result.returncode == 0, result.stderr
    assert "hello from the command line" in result.stdout

    # Step 2: 20 more turns over 4 contexts through the HTTP API, several in flight at once.
    lengths: dict[str, int] = {c: 0 for c in contexts}

    async def drive() -> None:
        async with httpx.AsyncClient(base_url=service.base, timeout=60) as client:
            for round_ in range(5):
                responses = await asyncio.gather(
                    *(
                        client.post(
                            f"/v1/contexts/{c}/messages", json={"content": f"round {round_} in {c}"}
                        )
                        for c in contexts
                    )
                )
                for context, response in zip(contexts, responses, strict=True):
                    assert response.status_code == 200, response.text
                    returned[context].extend(response.json()["events"])
                    lengths[context] = response.json()["events"][-1]["stream_version"]

    asyncio.run(drive())

    # Step 3: `chatllm audit` shows every event of each context exactly once, in stream order.
    for context in contexts:
        expected_count = lengths[context]
        deadline = time.monotonic() + 60
        while True:
            result = cli(service, "audit", "--context", context, "--format", "json")
            lines = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
            if len(lines) >= expected_count or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert result.returncode == 0, result.stderr
        assert [e["stream_version"] for e in lines] == list(range(1, expected_count + 1))
        assert len({e["event_id"] for e in lines}) == expected_count
        assert {e["stream_id"] for e in lines} == {context}
        for ref in returned[context]:
            assert lines[ref["stream_version"] - 1]["event_id"] == ref["event_id"]

    # Step 4: the table view names the types in order.
    table = cli(service, "audit", "--context", contexts[1])
    assert table.returncode == 0
    assert table.stdout.index("ContextCreated") < table.stdout.index("MessageReceived")


def test_bad_requests_get_a_4xx_with_a_message(service: Service) -> None:
    base = service.base
    empty = httpx.post(f"{base}/v1/contexts/c1/messages", json={"content": ""})
    assert empty.status_code == 400 and "content" in empty.json()["error"]["message"]
    bad_id = httpx.post(f"{base}/v1/contexts/bad%20id/messages", json={"content": "x"})
    assert bad_id.status_code == 400 and "context_id" in bad_id.json()["error"]["message"]
    not_json = httpx.post(
        f"{base}/v1/contexts/c1/messages",
        content=b"{",
        headers={"content-type": "application/json"},
    )
    assert not_json.status_code == 400 and not_json.json()["error"]["message"]
    httpx.post(
        f"{base}/v1/contexts/owned/messages", json={"content": "x"}, headers={"X-Tenant-Id": "a"}
    )
    foreign = httpx.post(
        f"{base}/v1/contexts/owned/messages", json={"content": "x"}, headers={"X-Tenant-Id": "b"}
    )
    assert foreign.status_code == 403 and "another tenant" in foreign.json()["detail"]


def test_audit_of_an_unknown_context_says_so(service: Service) -> None:
    result = cli(service, "audit", "--context", "never-used")
    assert result.returncode == 1
    assert "no events archived for context 'never-used'" in result.stderr


def test_demo_runs_and_ends_with_an_audit_trail(tmp_path: Path) -> None:
    env = {**os.environ, "CHATLLM_RAY__NAMESPACE": "chatllm-demo-test"}
    result = subprocess.run(
        [*CHATLLM, "demo"], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "audit trail of context demo-trip-lisbon" in result.stdout
    assert result.stdout.count("ReplyCompleted") == 3
    assert "events over 2 contexts went Ray actor" in result.stdout


def test_documents_tags_and_overrides_over_http(service: Service) -> None:
    base, context = service.base, "e2e-docs"
    doc = base64.b64encode(b"Opening hours: 9 to 17.").decode()
    # Step 1: attach a text document, tag the context, override its model and system prompt.
    attached = httpx.post(
        f"{base}/v1/contexts/{context}/documents",
        json={"name": "hours.txt", "mime_type": "text/plain", "content_base64": doc},
    )
    assert attached.status_code == 200, attached.text
    (document,) = attached.json()["documents"]
    assert document["size"] == 23 and "content" not in document
    tags = httpx.put(f"{base}/v1/contexts/{context}/tags", json={"tags": ["support", "hours"]})
    assert tags.json()["tags"] == ["hours", "support"]
    config = httpx.patch(
        f"{base}/v1/contexts/{context}/config",
        json={"overrides": {"model": "demo-large", "system_prompt": "Be brief."}},
    )
    assert config.json()["config"] == {"model": "demo-large", "system_prompt": "Be brief."}
    # Step 2: a turn uses them: the override picks the model.
    turn = httpx.post(
        f"{base}/v1/contexts/{context}/messages", json={"content": "When are you open?"}
    )
    assert turn.json()["model"] == "demo-large"
    view = httpx.get(f"{base}/v1/contexts/{context}").json()
    assert view["messages"] == 2 and view["tags"] == ["hours", "support"]
    # Step 3: removing the document is an event too; the audit trail has the whole history.
    removed = httpx.delete(f"{base}/v1/contexts/{context}/documents/{document['document_id']}")
    assert removed.json()["documents"] == []
    deadline = time.monotonic() + 30
    while True:
        types = [row["type"] for row in httpx.get(f"{base}/v1/contexts/{context}/events").json()]
        if "DocumentRemoved" in types or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert types[:4] == ["ContextCreated", "DocumentAttached", "TagsChanged", "ContextConfigured"]
    assert types[-1] == "DocumentRemoved"


def test_bad_context_commands_are_4xx_with_a_reason(service: Service) -> None:
    base = service.base
    too_big = base64.b64encode(b"x" * (256 * 1024 + 1)).decode()
    response = httpx.post(
        f"{base}/v1/contexts/e2e-big/documents", json={"name": "big.txt", "content_base64": too_big}
    )
    assert response.status_code == 413 and "the limit is 262144" in response.json()["detail"]
    response = httpx.post(
        f"{base}/v1/contexts/e2e-big/documents", json={"name": "x.txt", "content_base64": "%%%"}
    )
    assert response.status_code == 400 and "base64" in response.json()["detail"]
    response = httpx.patch(
        f"{base}/v1/contexts/e2e-big/config", json={"overrides": {"temperature": "9"}}
    )
    assert response.status_code == 400 and "unknown context settings" in response.json()["detail"]


def test_a_transcript_renders_hostile_text_harmlessly(service: Service) -> None:
    hostile = '<script>alert("pwned")</script>'
    httpx.post(f"{service.base}/v1/contexts/e2e-xss/messages", json={"content": hostile})
    page = httpx.get(f"{service.base}/v1/contexts/e2e-xss/transcript")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    # The demo model echoes the user, so both the message and the reply carry the payload.
    assert "<script" not in page.text and page.text.count("&lt;script&gt;") == 2


def test_prometheus_metrics_show_turns_and_projection_lag(service: Service) -> None:
    for i in range(3):
        httpx.post(f"{service.base}/v1/contexts/e2e-metrics/messages", json={"content": f"m{i}"})
    deadline = time.monotonic() + 30
    while True:
        text = httpx.get(f"{service.base}/metrics").text
        lag = [
            line
            for line in text.splitlines()
            if line.startswith("chatllm_projection_lag_seconds_count")
        ]
        if (lag and float(lag[0].split()[-1]) > 0) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    turns = [
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("chatllm_turns_total{") and 'status="ok"' in line
    ]
    assert sum(turns) >= 3
    assert any('processor="archive"' in line for line in lag)
    assert float(lag[0].split()[-1]) > 0
    assert "chatllm_turn_seconds_bucket" in text
    archived = next(
        line for line in text.splitlines() if line.startswith("chatllm_archived_events ")
    )
    assert float(archived.split()[-1]) > 0


def test_the_request_log_searches_and_exports_jsonl_and_csv(service: Service) -> None:
    base, tenant = service.base, {"X-Tenant-Id": "log-tenant"}
    for i in range(3):
        httpx.post(
            f"{base}/v1/contexts/log-ctx/messages", json={"content": f"find me {i}"}, headers=tenant
        )
    deadline = time.monotonic() + 30
    while True:
        found = httpx.get(f"{base}/v1/events", params={"context": "log-ctx"}, headers=tenant).json()
        if sum(e["type"] == "ReplyCompleted" for e in found) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    # Search: by type and by text, only this tenant's events.
    replies = httpx.get(
        f"{base}/v1/events", params={"type": "ReplyCompleted"}, headers=tenant
    ).json()
    assert len(replies) == 3 and {e["stream_id"] for e in replies} == {"log-ctx"}
    hits = httpx.get(
        f"{base}/v1/events", params={"q": "FIND ME 1", "type": "MessageReceived"}, headers=tenant
    )
    assert [e["event"]["payload"]["content"] for e in hits.json()] == ["find me 1"]
    assert (
        httpx.get(f"{base}/v1/events", params={"context": "log-ctx"}).json() == []
    )  # other tenant
    # Export: JSON lines are the events exactly as logged; CSV has a header and a row each.
    jsonl = httpx.get(f"{base}/v1/events", params={"format": "jsonl"}, headers=tenant)
    lines = [json.loads(line) for line in jsonl.text.splitlines()]
    assert len(lines) == len(found) and all(line["tenant_id"] == "log-tenant" for line in lines)
    csv_rows = httpx.get(
        f"{base}/v1/events", params={"format": "csv"}, headers=tenant
    ).text.splitlines()
    assert csv_rows[0].startswith("occurred_at,type,stream_id") and len(csv_rows) == len(found) + 1
    bad = httpx.get(f"{base}/v1/events", params={"since": "2026-01-01T00:00:00"}, headers=tenant)
    assert bad.status_code == 400 and "time zone" in bad.json()["detail"]


def test_chatllm_query_log_from_the_command_line(service: Service) -> None:
    # The service already holds turns of the default tenant from the earlier tests.
    table = cli(service, "query", "log", "--type", "ReplyCompleted", "--limit", "5")
    assert table.returncode == 0, table.stderr
    assert "request log (5 events)" in table.stdout and "ReplyCompleted" in table.stdout
    csv_out = cli(service, "query", "log", "--type", "MessageReceived", "--format", "csv")
    assert csv_out.returncode == 0 and csv_out.stdout.startswith("occurred_at,type")
    bad = cli(service, "query", "log", "--format", "xml")
    assert bad.returncode == 2 and "unknown format" in bad.stderr


def test_time_travel_shows_a_context_as_it_was(service: Service) -> None:
    base, tenant = service.base, {"X-Tenant-Id": "travel"}
    post = httpx.post(
        f"{base}/v1/contexts/tt-1/messages", json={"content": "first question"}, headers=tenant
    )
    assert post.status_code == 200
    time.sleep(0.05)
    moment = datetime.now(UTC).isoformat()
    time.sleep(0.05)
    httpx.post(f"{base}/v1/contexts/tt-1/messages", json={"content": "second"}, headers=tenant)
    httpx.put(f"{base}/v1/contexts/tt-1/tags", json={"tags": ["later"]}, headers=tenant)

    def at(when: str) -> dict[str, Any]:
        deadline = time.monotonic() + 30
        while True:  # the archive catches up within a moment
            response = httpx.get(
                f"{base}/v1/contexts/tt-1/state", params={"at": when}, headers=tenant
            )
            body: dict[str, Any] = response.json()
            if response.status_code == 200 and (
                when == moment or body["context"]["tags"] or time.monotonic() > deadline
            ):
                return body
            if time.monotonic() > deadline:
                raise AssertionError(response.text)
            time.sleep(0.3)

    then = at(moment)
    assert then["messages"][0]["content"] == "first question"
    assert len(then["messages"]) == 2 and then["context"]["tags"] == []
    assert then["limiter"]["last_decision"]["allowed"] is True
    assert then["router"]["sticky_model"] and then["router"]["last_route"]["model"]
    now = at(datetime.now(UTC).isoformat())
    assert len(now["messages"]) == 4 and now["context"]["tags"] == ["later"]

    shown = cli(service, "state", "--context", "tt-1", "--at", moment, "--tenant", "travel")
    assert shown.returncode == 0, shown.stderr
    assert "first question" in shown.stdout and "second" not in shown.stdout
    missing = httpx.get(
        f"{base}/v1/contexts/tt-1/state", params={"at": "2000-01-01T00:00:00Z"}, headers=tenant
    )
    assert missing.status_code == 404 and "no events" in missing.json()["detail"]
    naive = httpx.get(f"{base}/v1/contexts/tt-1/state", params={"at": "2026-01-01T00:00:00"})
    assert naive.status_code == 400


def test_audit_verify_through_the_service(service: Service) -> None:
    tenant = {"X-Tenant-Id": "chained"}
    for text in ("one", "two", "three"):
        reply = httpx.post(
            f"{service.base}/v1/contexts/chain-1/messages", json={"content": text}, headers=tenant
        )
        assert reply.status_code == 200
    deadline = time.monotonic() + 30
    while True:
        checked = cli(service, "audit", "verify", "--tenant", "chained", "--format", "json")
        result = json.loads(checked.stdout)
        if result["events"] >= 24 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert checked.returncode == 0 and result["ok"] and result["streams"] == 1
    assert result["unchained_streams"] == 0
    table = cli(service, "audit", "verify", "--tenant", "chained")
    assert "audit chain holds" in table.stdout


def test_forgetting_a_user_is_recorded_and_keeps_the_chain(service: Service) -> None:
    base, tenant = service.base, {"X-Tenant-Id": "gdpr"}
    for user, text in (("carol", "carol's address is 1 Main St"), ("dave", "dave asks")):
        reply = httpx.post(
            f"{base}/v1/contexts/gdpr-{user}/messages",
            json={"content": text, "user_id": user},
            headers=tenant,
        )
        assert reply.status_code == 200

    def memory() -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = httpx.get(f"{base}/v1/memory", headers=tenant).json()
        return found

    deadline = time.monotonic() + 30
    while len(memory()) < 2 and time.monotonic() < deadline:
        time.sleep(0.3)
    forgot = cli(service, "forget", "--user", "carol", "--yes", "--tenant", "gdpr")
    assert forgot.returncode == 0, forgot.stderr
    assert "erased the content of" in forgot.stdout
    questions = {m["user_id"]: m["question"] for m in memory()}
    assert questions == {"carol": "", "dave": "dave asks"}
    log = httpx.get(f"{base}/v1/events", params={"q": "Main St"}, headers=tenant).json()
    assert log == []
    verified = cli(service, "audit", "verify", "--tenant", "gdpr", "--format", "json")
    assert json.loads(verified.stdout)["ok"], verified.stdout
    while time.monotonic() < deadline:
        recorded = httpx.get(
            f"{base}/v1/events", params={"type": "UserForgotten"}, headers=tenant
        ).json()
        if recorded:
            break
        time.sleep(0.3)
    assert recorded[0]["event"]["payload"]["user_id"] == "carol"
    searched = cli(
        service,
        "audit",
        "search",
        "--action",
        "UserForgotten",
        "--tenant",
        "gdpr",
        "--format",
        "json",
    )
    assert [json.loads(line)["payload"]["user_id"] for line in searched.stdout.splitlines()] == [
        "carol"
    ]


def test_forgetting_reaches_what_the_shard_holds_live(service: Service) -> None:
    """After `forget`, the erased text appears in no answer: not the live transcript, not the
    context view, the audit trail, the request log, memory or a cached reply, and the
    conversation goes on (its audit chain intact)."""
    base, tenant = service.base, {"X-Tenant-Id": "gdpr-live"}
    secret = "my passport number is X1234567"
    first = httpx.post(
        f"{base}/v1/contexts/live-1/messages",
        json={"content": secret, "user_id": "erin", "title": f"about {secret}"},
        headers=tenant,
    )
    assert first.status_code == 200, first.text

    def reads() -> dict[str, str]:
        """Every read route that can show the context's text, as the caller sees it."""
        return {
            f"{path}?{params}": httpx.get(f"{base}{path}", params=params, headers=tenant).text
            for path, params in [
                ("/v1/contexts/live-1/transcript", {}),
                ("/v1/contexts/live-1", {}),
                ("/v1/contexts/live-1/events", {}),
                ("/v1/events", {"format": "jsonl"}),
                ("/v1/events", {"format": "csv"}),
                ("/v1/memory", {}),
                ("/v1/memory/stats", {}),
            ]
        }

    # The secret is there before (so a read that could show it is known to show it).
    shown = reads()
    seen = [k for k, text in shown.items() if secret in text]
    assert "/v1/contexts/live-1/transcript?{}" in seen and "/v1/events?{'format': 'jsonl'}" in seen
    forgot = cli(service, "forget", "--user", "erin", "--yes", "--tenant", "gdpr-live")
    assert forgot.returncode == 0, forgot.stderr
    leaked = {path: "passport" in text for path, text in reads().items()}
    assert not any(leaked.values()), leaked
    # The same question again is not answered from a cached reply about it.
    again = httpx.post(
        f"{base}/v1/contexts/live-1/messages",
        json={"content": "and what was it again?", "user_id": "frank"},
        headers=tenant,
    )
    assert again.status_code == 200 and "passport" not in again.text
    verified = cli(service, "audit", "verify", "--tenant", "gdpr-live", "--format", "json")
    assert json.loads(verified.stdout)["ok"], verified.stdout


def test_whatif_replays_recorded_requests_under_another_policy(
    service: Service, tmp_path: Path
) -> None:
    tenant = {"X-Tenant-Id": "wi"}
    for i in range(6):
        reply = httpx.post(
            f"{service.base}/v1/contexts/wi-{i}/messages",
            json={"content": f"question {i}", "user_id": "erin"},
            headers=tenant,
        )
        assert reply.status_code == 200
    policy = tmp_path / "policy.toml"
    policy.write_text(
        """
[limits]
user = "2/hour"
tenant = ""
rate_per_s = 0

[[routing.bands]]
name = "all"
max_complexity = 1.0
model = "demo-large"
"""
    )
    deadline = time.monotonic() + 30
    while True:
        run = cli(service, "whatif", "--policy", str(policy), "--tenant", "wi", "--format", "json")
        assert run.returncode == 0, run.stderr
        report = json.loads(run.stdout)
        if report["recorded"]["requests"] >= 6 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert report["recorded"]["requests"] == 6 and report["recorded"]["denied"] == 0
    assert report["whatif"]["denied"] == 4 and report["changed"]["newly_denied"] == 4
    assert report["whatif"]["models"] == {"demo-large": 2}
    again = cli(service, "whatif", "--policy", str(policy), "--tenant", "wi", "--format", "json")
    assert json.loads(again.stdout) == report  # deterministic
    table = cli(service, "whatif", "--policy", str(policy), "--tenant", "wi")
    assert "what if: policy.toml" in table.stdout and "model demo-large" in table.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[[routing.bands]]\nname = "x"\nmax_complexity = 1.0\nmodel = "nope"\n')
    refused = cli(service, "whatif", "--policy", str(bad), "--tenant", "wi")
    assert refused.returncode == 1 and "without deployments" in refused.stderr


def openai_shaped(response: httpx.Response, status: int) -> str:
    """The error's message, after checking it is OpenAI's shape with the given status."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == "invalid_request_error" and error["message"], error
    return str(error["message"])


def test_validation_errors_are_400_in_openai_shape_on_every_route(service: Service) -> None:
    base, tenant = service.base, {"X-Tenant-Id": "shape"}
    httpx.post(f"{base}/v1/contexts/shape-1/messages", json={"content": "hi"}, headers=tenant)
    rating = httpx.post(
        f"{base}/v1/contexts/shape-1/feedback",
        json={"message_id": "m", "rating": 9},
        headers=tenant,
    )
    assert "rating" in openai_shaped(rating, 400)
    assert "content" in openai_shaped(
        httpx.post(f"{base}/v1/contexts/shape-1/messages", json={}, headers=tenant), 400
    )
    assert "tags" in openai_shaped(
        httpx.put(f"{base}/v1/contexts/shape-1/tags", json={"tags": "x"}, headers=tenant), 400
    )
    assert "format" in openai_shaped(
        httpx.get(f"{base}/v1/events", params={"format": "xml"}, headers=tenant), 400
    )
    assert "limit" in openai_shaped(
        httpx.get(f"{base}/v1/memory", params={"limit": 0}, headers=tenant), 400
    )


def test_health_names_every_consumer_and_its_lag(service: Service) -> None:
    httpx.post(f"{service.base}/v1/contexts/health-1/messages", json={"content": "hi"})
    health = wait_for(
        lambda: (
            (h := httpx.get(f"{service.base}/healthz").json())["consumers"]["archive"]["lag"]
            is not None
            and h
        ),
        "the archive's lag",
    )
    assert health["status"] == "ok" and health["stuck"] == []
    assert {"archive", "ingest", "workflows"} <= set(health["consumers"])
    for name, consumer in health["consumers"].items():
        assert consumer["status"] in ("ok", "starting"), (name, consumer)
    assert health["consumers"]["archive"]["lag"] >= 0


def test_streamed_turns_are_counted_in_the_turn_metrics(service: Service) -> None:
    def counted() -> tuple[float, float]:
        text = httpx.get(f"{service.base}/metrics").text
        turns = sum(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("chatllm_turns_total{")
        )
        seconds = sum(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("chatllm_turn_seconds_count")
        )
        return turns, seconds

    before = counted()
    with httpx.stream(
        "POST",
        f"{service.base}/v1/chat/completions",
        json={"model": "auto", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
    ) as response:
        body = "".join(response.iter_text())
    assert "[DONE]" in body
    after = counted()
    assert after[0] == before[0] + 1 and after[1] == before[1] + 1


def test_the_cli_says_what_is_wrong_in_one_line(service: Service, tmp_path: Path) -> None:
    # CHATLLM_API_KEY, as --help advertises, is the CLI's key and not a config key.
    with_key = {**service.env, "CHATLLM_API_KEY": "sk-anything"}
    done = subprocess.run(
        [*CHATLLM, "query", "stats", "--url", service.base],
        env=with_key,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    audit = cli(service, "audit", "--context", "no-such", "--api-key", "sk-anything")
    assert audit.returncode == 1 and "no events archived" in audit.stderr
    missing = cli(service, "produce", str(tmp_path / "missing.jsonl"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().startswith("cannot read") and "No such file" in missing.stderr
    from infra.adapters.kafka.broker import free_port

    nowhere = f"http://127.0.0.1:{free_port()}"
    for args in (["chat", "hi"], ["query", "stats"], ["audit", "verify"]):
        gone = subprocess.run(
            [*CHATLLM, *args, "--url", nowhere],
            env=service.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert gone.returncode == 1, (args, gone.stderr)
        assert gone.stderr.startswith(f"cannot reach chat-llm at {nowhere}"), (args, gone.stderr)
        assert "Traceback" not in gone.stderr


def test_ctrl_c_stops_everything_it_started(service: Service) -> None:
    # Runs last in this module: it stops the service.
    from tests.e2e.test_fresh_clone import alive, descendants

    proc: subprocess.Popen[bytes] = service.proc
    # Everything below it: the broker, Ray's raylet, GCS and workers (which leave its
    # process group, not its tree), the processors.
    started = descendants(proc.pid)
    names = set()
    for pid in started:
        with contextlib.suppress(OSError):  # one may end meanwhile
            names.add(Path(f"/proc/{pid}/comm").read_text().strip())
    assert any("raylet" in n or "gcs_server" in n for n in names), names
    assert any(n.startswith("tansu") for n in names), names
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0
    log = (service.workdir / "up.log").read_text()
    assert "chat-llm stopped" in log
    # Nothing it started is left: the broker, and Ray's own processes too.
    deadline = time.monotonic() + 20
    while alive(started) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = alive(started)
    assert not left, [Path(f"/proc/{p}/cmdline").read_bytes()[:120] for p in left]
