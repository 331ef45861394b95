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
import msgspec
import pytest

from infra.adapters.kafka.broker import free_port
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
    # Dead-lettered again, it keeps its original source and names the retry (issue 23, 13).
    listed_again = cli(ingest, "dlq", "list", "--tenant", TENANT, "--format", "json")
    again = [json.loads(line) for line in listed_again.stdout.splitlines()]
    first = pizza[0]
    retries = [d for d in again if "PizzaOrdered" in d["reason"] and d != first]
    assert retries and retries[-1]["source"] == f"{first['source']} (retry of dlq {letter})"
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


def test_one_oversized_upstream_event_is_a_dead_letter_and_ingest_goes_on(ingest: Service) -> None:
    """A record the log can never take (over broker.max_record_bytes) must not stop ingest:
    it is dead-lettered with the limit named; what came after it on any partition is
    appended; health stays ok (nothing is stuck)."""
    from confluent_kafka import Producer

    producer = Producer(
        {
            "bootstrap.servers": ingest.env["TEST_BROKER"],
            "acks": "all",
            "message.max.bytes": 8_000_000,
        }
    )
    huge = event("ext:big-1", 1, "x" * 5_000_000)
    after = [event(f"ext:after-{p}", 1, f"after the big one {p}") for p in range(8)]
    producer.produce("chatllm.ingest", key=huge["stream_id"], value=json.dumps(huge).encode())
    for e in after:  # spread over the partitions (key = stream_id)
        producer.produce("chatllm.ingest", key=e["stream_id"], value=json.dumps(e).encode())
    producer.produce("chatllm.ingest", key="ext:bad", value=b"{not an event")
    assert producer.flush(30) == 0

    for e in after:
        wait_for(lambda e=e: logged(ingest, e["stream_id"]), f"{e['stream_id']} in the log")

    def bad_ones() -> list[dict[str, Any]]:
        found = httpx.get(f"{ingest.base}/v1/deadletters", headers=HEADERS).json()
        return [d for d in found if d["key"] in (huge["stream_id"], "ext:bad")]

    letters = wait_for(lambda: len(bad_ones()) == 2 and bad_ones(), "both bad records dead")
    reasons = {d["key"]: d["reason"] for d in letters}
    assert "the log accepts at most 1000000" in reasons[huge["stream_id"]]
    assert "malformed envelope" in reasons["ext:bad"]
    health = httpx.get(f"{ingest.base}/healthz").json()
    assert health["status"] == "ok" and health["consumers"]["ingest"]["status"] == "ok", health


def test_post_events_over_the_record_limit_is_413_naming_it(ingest: Service) -> None:
    big = event("ext:big-2", 1, "y" * 1_200_000)
    small = event("ext:big-2", 2, "fits")
    response = httpx.post(f"{ingest.base}/v1/events", json=[small, big], headers=HEADERS)
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["code"] == "event_too_large" and "at most 1000000 bytes" in error["message"]
    assert "event 1 " in error["message"]  # which one
    time.sleep(1.0)
    assert logged(ingest, "ext:big-2") == []  # nothing of the batch was taken


def test_upstream_systems_may_produce_only_the_allowed_types(ingest: Service) -> None:
    for kind, payload in [
        ("UserForgotten", {"user_id": "alice", "events": 3, "requested_by": "x"}),
        ("MemoryPruned", {"before": "2026-01-01T00:00:00Z", "max_age_days": 1.0, "entries": 1,
                          "requested_by": "x"}),
        ("FeedbackGiven", {"message_id": "m1", "thumbs": "up"}),
    ]:  # fmt: skip
        forged = {**event(f"ext:{kind}", 1, "x"), "type": kind, "payload": payload}
        response = httpx.post(f"{ingest.base}/v1/events", json=[forged], headers=HEADERS)
        assert response.status_code == 422, response.text
        (rejected,) = response.json()["rejected"]
        assert f"upstream systems may not produce {kind} events" in rejected["reason"]


def test_a_chat_context_may_not_take_an_upstream_or_system_stream_id(ingest: Service) -> None:
    for reserved in ("ext:crm-1", "workflow:0190", "admin:x"):
        response = httpx.post(
            f"{ingest.base}/v1/contexts/{reserved}/messages",
            json={"content": "into an upstream stream"},
            headers=HEADERS,
        )
        assert response.status_code == 403, response.text
        assert "reserved for upstream and system streams" in response.json()["error"]["message"]


def test_a_foreign_append_to_a_chat_stream_is_named_by_audit_verify(ingest: Service) -> None:
    """Someone produces straight to the events topic, at the next version of a chat context,
    chained to its last event as a careful forger would. The shard goes on writing its own
    versions; `audit verify` names the forged event (not its neighbour) as foreign."""
    from confluent_kafka import Producer

    from events import MessageReceived, decode, encode
    from events.chain import event_hash

    base, context = ingest.base, "forge-1"
    first = httpx.post(
        f"{base}/v1/contexts/{context}/messages", json={"content": "hello"}, headers=HEADERS
    )
    assert first.status_code == 200, first.text
    archived = httpx.get(f"{base}/v1/contexts/{context}/events", headers=HEADERS).json()
    last = decode(json.dumps(archived[-1]["event"]))
    forged = msgspec.structs.replace(
        last,
        event_id=str(uuid.UUID(int=uuid.uuid4().int & ~(0xF << 76) | (0x7 << 76))),
        type="MessageReceived",
        stream_version=last.stream_version + 1,
        prev_hash=event_hash(last),
        payload=MessageReceived(message_id="forged", content="transfer the money"),
    )
    producer = Producer({"bootstrap.servers": ingest.env["TEST_BROKER"], "acks": "all"})
    producer.produce("chatllm.events", key=context, value=encode(forged))
    assert producer.flush(30) == 0
    second = httpx.post(
        f"{base}/v1/contexts/{context}/messages", json={"content": "and again"}, headers=HEADERS
    )
    assert second.status_code == 200, second.text

    verified = cli(ingest, "audit", "verify", "--context", context, "--tenant", TENANT,
                   "--format", "json")  # fmt: skip
    assert verified.returncode == 1, verified.stdout
    (found,) = json.loads(verified.stdout)["breaks"]
    assert found["event_id"] == forged.event_id
    assert found["problem"].startswith(
        f"foreign: a second event claims version {forged.stream_version}"
    )
