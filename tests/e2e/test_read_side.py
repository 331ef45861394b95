"""The read side as users see it: conversation memory, analytics, anomalies and the
dashboard, through `chatllm up`'s HTTP API, the `chatllm query` commands, and a real
headless browser. Every query is scoped to the caller's tenant."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from infra.adapters.clickhouse.reads import ANALYTICS_ROW, MEMORY_ROW, QUALITY_ROW
from streams.projections import ANOMALY_COLUMNS
from tests.e2e.conftest import Service, cli, start_service, stop_service, wait_for

pytestmark = pytest.mark.e2e

ARTIFACTS = Path(os.environ.get("CHATLLM_TEST_ARTIFACTS", "test-artifacts"))
TENANT = {"X-Tenant-Id": "reads"}


@pytest.fixture(scope="module")
def reads(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A service whose slow-request detector fires on every reply (so anomalies exist)."""
    running = start_service(
        tmp_path_factory.mktemp("reads"),
        # COLUMNS: the CLI's tables are as wide as a terminal (not 80 columns under pytest).
        extra_env={"CHATLLM_ANOMALIES__SLOW_REQUEST_MS": "0.000001", "COLUMNS": "220"},
    )
    try:
        yield running
    finally:
        stop_service(running)


def send(base: str, context: str, content: str, headers: dict[str, str]) -> dict[str, Any]:
    response = httpx.post(
        f"{base}/v1/contexts/{context}/messages",
        json={"content": content},
        headers=headers,
        timeout=30,
    )
    assert response.status_code == 200, response.text
    reply: dict[str, Any] = response.json()
    return reply


@pytest.fixture(scope="module")
def traffic(reads: Service) -> dict[str, Any]:
    """Conversations in two contexts of tenant `reads`, feedback and tags; one conversation
    of another tenant that no query of `reads` may show."""
    base = reads.base
    first = send(base, "support-1", "How do I reset my password?", TENANT)
    send(base, "support-1", "thanks, can you give me an example?", TENANT)
    send(base, "support-1", "why is that?", TENANT)
    for i in range(3):
        send(base, "code-1", f"Why does my python function {i} raise an exception?", TENANT)
    assert httpx.put(
        f"{base}/v1/contexts/support-1/tags", json={"tags": ["vip", "billing"]}, headers=TENANT
    ).is_success
    feedback = httpx.post(
        f"{base}/v1/contexts/support-1/feedback",
        json={"message_id": first["message_id"], "thumbs": "up", "rating": 5, "reason": "clear"},
        headers=TENANT,
    )
    assert feedback.status_code == 200, feedback.text
    send(base, "secret-ctx", "the other tenant's secret question", {"X-Tenant-Id": "others"})
    wait_for(
        lambda: (
            len(httpx.get(f"{base}/v1/memory", headers=TENANT).json()) >= 6
            and httpx.get(f"{base}/v1/analytics/conversations", headers=TENANT).json()["feedback"]
        ),
        "the projections to catch up",
    )
    return {"first": first}


def test_conversation_memory_over_http(reads: Service, traffic: dict[str, Any]) -> None:
    memory = httpx.get(f"{reads.base}/v1/memory", headers=TENANT).json()
    assert len(memory) == 6
    newest = memory[0]
    assert newest["context_id"] == "code-1" and newest["status"] == "ok"
    assert newest["question"].startswith("Why does my python function 2")
    assert newest["prompt_tokens"] > 0 and newest["completion_tokens"] > 0
    support = [m for m in memory if m["context_id"] == "support-1"]
    assert all(m["tags"] == ["billing", "vip"] for m in support)
    assert {m["sentiment_label"] for m in memory} <= {"positive", "neutral", "negative"}
    assert not any("secret" in json.dumps(m) for m in memory)

    stats = httpx.get(f"{reads.base}/v1/memory/stats", headers=TENANT).json()
    assert stats["total"] == 6
    assert stats["by_context"] == {"code-1": 3, "support-1": 3}
    assert sum(stats["sentiment_breakdown"].values()) == 6
    assert stats["tokens"]["total"] > 0 and stats["avg_duration_ms"] >= 0

    assert list(memory[0]) == list(MEMORY_ROW)  # what an empty CSV's header says
    as_csv = httpx.get(f"{reads.base}/v1/memory", params={"format": "csv"}, headers=TENANT)
    assert as_csv.headers["content-type"].startswith("text/csv")
    assert len(list(csv.DictReader(io.StringIO(as_csv.text)))) == 6


def test_analytics_and_conversation_analytics(reads: Service, traffic: dict[str, Any]) -> None:
    buckets = httpx.get(f"{reads.base}/v1/analytics", headers=TENANT).json()
    assert all(list(b) == list(ANALYTICS_ROW) for b in buckets)
    assert sum(b["requests"] for b in buckets) == 6
    assert sum(b["replies"] for b in buckets) == 6
    assert all(b["latency_p50_ms"] is not None for b in buckets if b["replies"])
    models: dict[str, int] = {}
    for b in buckets:
        for model, n in b["models"].items():
            models[model] = models.get(model, 0) + n
    assert sum(models.values()) == 6
    # Every message received is scored: six messages, six sentiments, over the buckets.
    moods = [b["sentiment"] for b in buckets]
    assert all(set(m) >= {"positive", "neutral", "negative"} for m in moods)
    assert sum(sum(m.values()) for m in moods) == 6

    talk = httpx.get(f"{reads.base}/v1/analytics/conversations", headers=TENANT).json()
    assert talk["replies"] == 6 and talk["feedback"] == 1
    assert talk["satisfaction"] == 1.0 and talk["thumbs_up"] == 1
    assert talk["topics"]["code"] == 3 and talk["topics"]["support"] == 1
    # Follow-ups: each context's first message is not one.
    # ("why ..." reads as a clarification, "thanks, ..." as thanks.)
    assert talk["follow_ups"] == {"clarification": 3, "thanks": 1}


def test_a_csv_with_no_rows_still_has_its_header_row(reads: Service) -> None:
    nobody = {"X-Tenant-Id": "nobody-here"}
    for path, columns in (
        ("/v1/anomalies", ANOMALY_COLUMNS),
        ("/v1/memory", MEMORY_ROW),
        ("/v1/analytics", ANALYTICS_ROW),
        ("/v1/analytics/quality", QUALITY_ROW),
    ):
        answer = httpx.get(f"{reads.base}{path}", params={"format": "csv"}, headers=nobody)
        assert answer.status_code == 200, answer.text
        assert answer.text.splitlines() == [",".join(columns)], path


def test_anomalies_are_events_and_rows(reads: Service, traffic: dict[str, Any]) -> None:
    anomalies = wait_for(
        lambda: httpx.get(f"{reads.base}/v1/anomalies", headers=TENANT).json(), "anomalies"
    )
    slow = [a for a in anomalies if a["detector"] == "slow_request"]
    assert slow and slow[0]["observed"] > slow[0]["threshold"]
    # Each finding is an AnomalyDetected event in the log (the request log shows it).
    logged = httpx.get(
        f"{reads.base}/v1/events", params={"type": "AnomalyDetected"}, headers=TENANT
    ).json()
    assert {e["event_id"] for e in logged} >= {a["event_id"] for a in slow}
    others = httpx.get(f"{reads.base}/v1/anomalies", headers={"X-Tenant-Id": "nobody"}).json()
    assert others == []


def test_query_commands_print_tables_json_and_csv(reads: Service, traffic: dict[str, Any]) -> None:
    table = cli(reads, "query", "memory", "--tenant", "reads")
    assert table.returncode == 0, table.stderr
    assert "conversation memory (6)" in table.stdout and "support-1" in table.stdout
    as_json = cli(reads, "query", "memory", "--tenant", "reads", "--format", "json")
    assert len(as_json.stdout.strip().splitlines()) == 6
    stats = cli(reads, "query", "stats", "--tenant", "reads", "--format", "json")
    assert json.loads(stats.stdout)["total"] == 6
    analytics = cli(reads, "query", "analytics", "--tenant", "reads", "--format", "csv")
    assert analytics.returncode == 0 and analytics.stdout.startswith("bucket,requests")
    talk = cli(reads, "query", "analytics", "--conversations", "--tenant", "reads")
    assert "satisfaction" in talk.stdout
    anomalies = cli(reads, "query", "anomalies", "--tenant", "reads")
    assert anomalies.returncode == 0 and "slow_request" in anomalies.stdout
    bad = cli(reads, "query", "memory", "--since", "yesterday")
    assert bad.returncode == 1 and ("422" in bad.stderr or "400" in bad.stderr)


def test_replay_rebuild_through_the_running_service(
    reads: Service, traffic: dict[str, Any]
) -> None:
    def views() -> list[Any]:
        return [
            httpx.get(f"{reads.base}{path}", headers=TENANT).json()
            for path in ("/v1/memory", "/v1/memory/stats", "/v1/analytics", "/v1/anomalies")
        ]

    before = views()
    rebuilt = cli(reads, "replay", "rebuild", "--all")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "rebuilt anomalies, facts, prunes" in rebuilt.stdout
    assert views() == before  # the same projections, row for row, as the queries show them
    bad = cli(reads, "replay", "rebuild", "--projection", "nope")
    assert bad.returncode == 1 and "unknown projections" in bad.stderr


def test_bad_query_parameters_are_4xx_with_a_message(reads: Service) -> None:
    naive = httpx.get(f"{reads.base}/v1/analytics", params={"since": "2026-01-01T00:00:00"})
    assert naive.status_code == 400 and "time zone" in naive.json()["detail"]
    too_many = httpx.get(f"{reads.base}/v1/memory", params={"limit": 0})
    assert too_many.status_code == 400 and "limit" in too_many.json()["error"]["message"]
    feedback = httpx.post(
        f"{reads.base}/v1/contexts/support-1/feedback",
        json={"message_id": "no-such-reply", "thumbs": "up"},
        headers=TENANT,
    )
    assert feedback.status_code == 400 and "no reply" in feedback.json()["detail"]


def test_pruning_is_recorded_and_hides_old_memory(reads: Service, traffic: dict[str, Any]) -> None:
    # A tiny age prunes everything so far; the prune is an event, then the memory is gone.
    pruned = httpx.post(
        f"{reads.base}/v1/memory/prune",
        json={"max_age_days": 1e-9},
        headers={"X-Tenant-Id": "others"},
    )
    assert pruned.status_code == 200 and pruned.json()["pruned"] == {"others": 1}
    wait_for(
        lambda: (
            httpx.get(f"{reads.base}/v1/memory", headers={"X-Tenant-Id": "others"}).json() == []
        ),
        "the prune to apply",
    )
    logged = httpx.get(
        f"{reads.base}/v1/events",
        params={"type": "MemoryPruned"},
        headers={"X-Tenant-Id": "others"},
    ).json()
    assert len(logged) == 1 and logged[0]["event"]["payload"]["entries"] == 1
    # Only that tenant's memory: `reads` keeps all of its conversations.
    assert len(httpx.get(f"{reads.base}/v1/memory", headers=TENANT).json()) == 6


def test_the_openapi_spec_documents_the_queries(reads: Service) -> None:
    paths = httpx.get(f"{reads.base}/openapi.json").json()["paths"]
    for path in ("/v1/memory", "/v1/memory/stats", "/v1/analytics", "/v1/anomalies"):
        assert path in paths and paths[path]["get"]["description"]


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        raise AssertionError("Debian's chromium is needed (make test installs it)")
    return found


def test_the_dashboard_renders_live_data_in_a_real_browser(
    reads: Service, traffic: dict[str, Any]
) -> None:
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=_chromium(),
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            response = page.goto(f"{reads.base}/dashboard")
            assert response is not None and response.status == 200
            assert "script-src 'nonce-" in response.headers["content-security-policy"]
            page.fill("#tenant", "reads")
            page.wait_for_function("() => Number(document.body.dataset.updated || 0) > 0")
            # Traffic while the page is open: the charts must follow it.
            send(reads.base, "code-1", "one more while the dashboard is open", TENANT)
            page.wait_for_function(
                "() => document.querySelectorAll('#throughput path.series').length > 0",
                timeout=20_000,
            )
            page.wait_for_function(
                "() => document.querySelector('#anomalies tbody').rows.length > 0",
                timeout=20_000,
            )
            page.wait_for_function(
                "() => Number(document.querySelector('#lag').dataset.points || 0) > 0",
                timeout=20_000,
            )
            requests = page.eval_on_selector_all(
                "#totals tbody tr",
                "rows => rows.map(r => [r.cells[0].textContent, r.cells[1].textContent])",
            )
            totals = dict(requests)
            assert int(totals["requests"]) >= 6 and int(totals["replies"]) >= 6
            models = page.eval_on_selector_all("#models tbody tr", "rows => rows.length")
            assert models >= 1
            # With no errors the error chart's axis reads 0..1 (not "1.00e-9").
            error_axis = page.eval_on_selector_all(
                "#errors .y-label", "ts => ts.map(t => t.textContent)"
            )
            assert error_axis == ["0", "1"], error_axis
            # Sentiment: a line per label, and the six scored messages on them.
            page.wait_for_function(
                "() => document.querySelectorAll('#sentiment path.series').length === 3"
            )
            scored = page.evaluate(
                "() => [...document.querySelectorAll('#sentiment circle')].length"
            )
            assert scored >= 1
            # The time axis is labelled at several round moments, in order, all different.
            times = page.eval_on_selector_all(
                "#throughput .x-label", "ts => ts.map(t => t.textContent)"
            )
            assert len(times) >= 3 and len(set(times)) == len(times), times
            points = page.eval_on_selector("#throughput", "svg => svg.dataset.points")
            assert int(points) >= 2 * 90  # two series, every 10 s bucket of 15 minutes
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        finally:
            browser.close()
    assert errors == []


def test_every_time_in_the_answers_carries_its_zone(
    reads: Service, traffic: dict[str, Any]
) -> None:
    """Times are UTC and say so (issue 23, item 7): the request log in json and csv, a
    context's events, memory, anomalies."""

    def zoned(value: str) -> bool:
        return value.endswith(("Z", "+00:00"))

    events = httpx.get(f"{reads.base}/v1/events", headers=TENANT).json()
    assert events and all(zoned(e["occurred_at"]) for e in events)
    rows = list(csv.DictReader(io.StringIO(httpx.get(
        f"{reads.base}/v1/events", params={"format": "csv"}, headers=TENANT).text)))  # fmt: skip
    assert rows and all(zoned(r["occurred_at"]) for r in rows)
    logged = httpx.get(f"{reads.base}/v1/contexts/support-1/events", headers=TENANT).json()
    assert logged and all(zoned(e["occurred_at"]) for e in logged)
    memory = httpx.get(f"{reads.base}/v1/memory", headers=TENANT).json()
    assert all(zoned(m["started_at"]) and zoned(m["ended_at"]) for m in memory)


def test_chatllm_sql_reads_the_callers_tenant_only_and_refuses_the_rest(
    reads: Service, traffic: dict[str, Any]
) -> None:
    """`chatllm sql`: your own SELECT, read-only, over your tenant's rows (issue 23, 15)."""

    def sql(query: str, tenant: str = "reads") -> Any:
        return cli(reads, "sql", query, "--tenant", tenant, "--format", "json")

    mine = sql("SELECT type, count() AS n FROM chatllm.events FINAL GROUP BY type ORDER BY type")
    assert mine.returncode == 0, mine.stderr
    counts = {r["type"]: r["n"] for r in map(json.loads, mine.stdout.splitlines())}
    assert counts["MessageReceived"] >= 6
    # Another tenant's secret is not in this tenant's rows, and is in its own (the archive:
    # the pruning test above redacted the projections' text of tenant `others`).
    secret = "SELECT body FROM chatllm.events WHERE body LIKE '%secret question%'"
    assert sql(secret).stdout.strip() == ""
    theirs = sql(secret, tenant="others")
    assert theirs.returncode == 0 and "secret question" in theirs.stdout
    for bad, why in (
        ("SELECT * FROM system.tables", "may not be queried"),
        ("SELECT file('/etc/passwd')", "may not be used"),
        ("DROP TABLE chatllm.events", "only SELECT"),
        ("SELECT 1; SELECT 2", "one statement"),
        ("SELECT * FROM chatllm.events SETTINGS max_threads = 1", "SETTINGS"),
    ):
        refused = sql(bad)
        assert refused.returncode != 0 and why in refused.stderr, (bad, refused.stderr)
