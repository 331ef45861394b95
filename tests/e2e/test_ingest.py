"""Ingest from upstream systems, as they would use it: POST /v1/events, `chatllm produce`,
and a Kafka client that is not ours (confluent-kafka, librdkafka) writing to the ingest
topic; what fails is in the dead-letter topic, listed and re-driven with `chatllm dlq`."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from infra.broker import free_port
from tests.e2e.conftest import Service, cli, start_service, stop_service, wait_for

pytestmark = pytest.mark.e2e

TENANT = "upstream"
HEADERS = {"X-Tenant-Id": TENANT}


@pytest.fixture(scope="module")
def ingest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    port = free_port()  # a known broker address, for the foreign Kafka client
    running = start_service(
        tmp_path_factory.mktemp("ingest"), extra_env={"CHATLLM_BROKER__EMBEDDED_PORT": str(port)}
    )
    running.env["TEST_BROKER"] = f"127.0.0.1:{port}"
    try:
        yield running
    finally:
        stop_service(running)


def event(stream: str, version: int, text: str, tenant: str = TENANT) -> dict[str, Any]:
    """An upstream event in the documented JSON format."""
    event_id = str(uuid.UUID(int=uuid.uuid4().int & ~(0xF << 76) | (0x7 << 76)))
    return {
        "event_id": event_id,
        "type": "MessageReceived",
        "schema": 1,
        "occurred_at": datetime.now(UTC).isoformat(),
        "stream_id": stream,
        "stream_version": version,
        "tenant_id": tenant,
        "user_id": "crm-bot",
        "trace_id": uuid.uuid4().hex,
        "span_id": uuid.uuid4().hex[:16],
        "correlation_id": f"{stream}-{version}",
        "payload": {"message_id": f"m{version}", "content": text, "role": "user"},
    }


def logged(service: Service, stream: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = httpx.get(
        f"{service.base}/v1/events", params={"context": stream}, headers=HEADERS
    ).json()
    return found


def test_post_events_checks_each_and_stores_each_once(ingest: Service) -> None:
    good = [event("ext:crm-1", v, f"ticket note {v}") for v in (1, 2, 3)]
    bad_stream = event("ctx-1", 1, "into a chat context")
    other_tenant = event("ext:crm-2", 1, "not mine", tenant="someone-else")
    response = httpx.post(
        f"{ingest.base}/v1/events", json=[*good, bad_stream, other_tenant], headers=HEADERS
    )
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["accepted"] == 3
    reasons = {r["index"]: r["reason"] for r in result["rejected"]}
    assert "is not an upstream stream" in reasons[3] and "not the caller's tenant" in reasons[4]
    stored = wait_for(lambda: len(logged(ingest, "ext:crm-1")) == 3, "the events in the log")
    assert stored
    # The same events again: accepted, and still stored once each.
    again = httpx.post(f"{ingest.base}/v1/events", json=good, headers=HEADERS)
    assert again.json()["accepted"] == 3
    wait_for(lambda: httpx.get(f"{ingest.base}/v1/live").json()["ingested"] >= 6, "re-ingest")
    time.sleep(1.0)
    assert [e["event_id"] for e in logged(ingest, "ext:crm-1")] == [g["event_id"] for g in good]

    none_valid = httpx.post(f"{ingest.base}/v1/events", json=[bad_stream], headers=HEADERS)
    assert none_valid.status_code == 422
    not_json = httpx.post(f"{ingest.base}/v1/events", content=b"{oops", headers=HEADERS)
    assert not_json.status_code == 400 and "JSON array" in not_json.json()["detail"]


def test_chatllm_produce_and_the_dead_letter_commands(ingest: Service, tmp_path: Path) -> None:
    lines = [event("ext:crm-3", 1, "from a file"), event("ext:crm-3", 2, "second line")]
    broken = {**event("ext:crm-3", 3, "x"), "type": "PizzaOrdered"}
    source = tmp_path / "events.jsonl"
    source.write_text("\n".join(json.dumps(e) for e in [lines[0], broken, lines[1]]) + "\n")
    produced = cli(ingest, "produce", str(source), "--tenant", TENANT)
    assert produced.returncode == 1  # one line was rejected
    assert "accepted 2, rejected 1" in produced.stdout
    assert "line 2: unknown event type 'PizzaOrdered'" in produced.stderr
    wait_for(lambda: len(logged(ingest, "ext:crm-3")) == 2, "the produced events")

    listed = cli(ingest, "dlq", "list", "--tenant", TENANT, "--format", "json")
    letters = [json.loads(line) for line in listed.stdout.splitlines()]
    pizza = [d for d in letters if "PizzaOrdered" in d["reason"]]
    assert pizza and pizza[0]["processor"] == "http.ingest" and pizza[0]["tenant"] == TENANT
    letter = f"{pizza[0]['partition']}/{pizza[0]['offset']}"
    shown = cli(ingest, "dlq", "show", letter, "--tenant", TENANT)
    assert shown.returncode == 0 and json.loads(shown.stdout)["value"] == json.dumps(broken)
    retried = cli(ingest, "dlq", "retry", letter, "--tenant", TENANT)
    assert retried.returncode == 1 and "rejected again" in retried.stderr
    table = cli(ingest, "dlq", "list", "--tenant", TENANT)
    assert table.returncode == 0 and "dead letters" in table.stdout
    # Another tenant sees none of them.
    assert cli(ingest, "dlq", "list", "--tenant", "x", "--format", "json").stdout.count(TENANT) == 0


def test_a_foreign_kafka_client_feeds_the_projections(ingest: Service) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": ingest.env["TEST_BROKER"], "acks": "all"})
    events = [event("ext:kafka-1", v, f"from librdkafka {v}") for v in (1, 2)]
    for e in events:
        producer.produce("chatllm.ingest", key=e["stream_id"], value=json.dumps(e).encode())
    producer.produce("chatllm.ingest", key="junk", value=b"\xff not an event")
    assert producer.flush(30) == 0

    memory = wait_for(
        lambda: httpx.get(
            f"{ingest.base}/v1/memory", params={"context": "ext:kafka-1"}, headers=HEADERS
        ).json(),
        "the upstream conversation in the memory projection",
    )
    assert {m["question"] for m in memory} == {"from librdkafka 1", "from librdkafka 2"}
    letters = wait_for(
        lambda: [
            d
            for d in httpx.get(f"{ingest.base}/v1/deadletters", headers=HEADERS).json()
            if d["key"] == "junk"
        ],
        "the junk record in the dead-letter topic",
    )
    assert letters[0]["processor"] == "chatllm.ingest"
    assert "malformed envelope" in letters[0]["reason"]
