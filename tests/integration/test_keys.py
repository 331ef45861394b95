"""API keys as events on the real broker and chDB: rotation with its grace period (the
clock injected), a second process following a revocation, and the follower's start from
the archive."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from actors.keys import KEYS_STREAM, Refused, hash_key
from events import KeyIssued, encode
from events.standalone import standalone
from infra.adapters.clickhouse.store import AsyncStore, ClickHouseStore
from infra.adapters.clock import SystemClock
from infra.adapters.kafka.clients import KafkaEventSink
from infra.http.app import build_api
from infra.services.keys import RECORD_KEY, KeyService
from streams.archive import archive_row
from tests.conftest import Topics, make_settings
from tests.unit.test_auth_modes import RecordingGateway

ROOT = "sk-root"


class SetClock(SystemClock):
    """The wall clock, until a test moves it."""

    def __init__(self) -> None:
        self.at = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)

    def now(self) -> datetime:
        return self.at


def _settings(broker: Any, topics: Topics, **extra: Any) -> Any:
    root = {"sha256": hash_key(ROOT), "tenant": "acme", "user": "root",
            "scopes": ["admin", "chat", "query"]}  # fmt: skip
    return make_settings(
        broker=broker, topics=topics, **{"auth.required": True, "auth.keys": [root]}, **extra
    )


async def _wait(check: Any, what: str, timeout_s: float = 20) -> float:
    began = time.monotonic()
    while not check():
        if time.monotonic() - began > timeout_s:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - began


async def test_a_rotated_key_works_until_its_grace_ends_then_is_a_401_naming_its_expiry(
    broker: Any, topics: Topics
) -> None:
    settings = _settings(broker, topics)
    clock = SetClock()
    sink = KafkaEventSink(broker.bootstrap_servers, topics.events, settings.broker)
    keys = KeyService(settings, sink, None, broker.bootstrap_servers, clock=clock)
    api = build_api(gateway=RecordingGateway(), store=None, settings=settings,  # type: ignore[arg-type]
                    archive_stats=lambda: (0, 0), keys=keys)  # fmt: skip
    root = {"Authorization": f"Bearer {ROOT}"}
    transport = httpx.ASGITransport(app=api)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:

            async def view(key: str) -> httpx.Response:
                return await http.get("/v1/contexts/c1", headers={"Authorization": f"Bearer {key}"})

            made = await http.post("/v1/admin/keys", json={"user": "ann", "scopes": ["chat"]},
                                   headers=root)  # fmt: skip
            assert made.status_code == 200, made.text
            old, old_id = made.json()["key"], made.json()["key_id"]
            assert (await view(old)).status_code == 200

            rotated = await http.post(f"/v1/admin/keys/{old_id}/rotate",
                                      json={"grace_s": 3600}, headers=root)  # fmt: skip
            assert rotated.status_code == 200, rotated.text
            new = rotated.json()["key"]
            assert rotated.json()["replaces"] == old_id and new != old
            assert rotated.json()["rotated"]["expires_at"] == "2026-06-01T13:00:00Z"

            clock.at += timedelta(minutes=59)  # within the grace: both work
            assert (await view(old)).status_code == 200
            assert (await view(new)).status_code == 200

            clock.at += timedelta(minutes=1)  # the grace has ended
            refused = await view(old)
            assert refused.status_code == 401
            error = refused.json()["error"]
            assert error["code"] == "expired_api_key"
            assert "expired at 2026-06-01T13:00:00Z" in error["message"]
            assert (await view(new)).status_code == 200
    finally:
        await sink.stop()


async def test_a_second_process_follows_a_revocation(broker: Any, topics: Topics) -> None:
    settings = _settings(broker, topics)
    sink = KafkaEventSink(broker.bootstrap_servers, topics.events, settings.broker)
    writer = KeyService(settings, sink, None, broker.bootstrap_servers)
    reader = KeyService(settings, None, None, broker.bootstrap_servers)
    try:
        async with reader.following():
            secret, key = await writer.issue("acme", "bob", "root")
            digest = hash_key(secret)
            await _wait(lambda: reader.ring.get(key.key_id) is not None, "the KeyIssued")
            assert reader.ring.check(digest, datetime.now(UTC)) is not None
            await writer.revoke("acme", key.key_id, "root", "lost laptop")
            took = await _wait(
                lambda: isinstance(reader.ring.check(digest, datetime.now(UTC)), Refused),
                "the KeyRevoked",
            )
            refused = reader.ring.check(digest, datetime.now(UTC))
            assert isinstance(refused, Refused) and refused.code == "revoked_api_key"
            assert "lost laptop" in refused.message
            print(f"revocation followed in {took * 1000:.0f} ms")
    finally:
        await sink.stop()


async def test_the_follower_starts_from_the_archive_and_reads_the_log_after_it(
    broker: Any, topics: Topics, store: ClickHouseStore
) -> None:
    settings = _settings(broker, topics)
    clock = SystemClock()

    def issued(key_id: str) -> Any:
        payload = KeyIssued(key_id=key_id, sha256=hash_key(key_id), user="u")
        return standalone(payload, event_id=clock.new_event_id(), tenant_id="acme",
                          user_id="root", occurred_at=clock.now(), stream=KEYS_STREAM)  # fmt: skip

    # Archived, and gone from the log (as after retention): only the archive knows it.
    archived = issued("key-archived")
    store.insert_archive([archive_row(archived, encode(archived), topic=topics.events,
                                      partition=0, offset=5)])  # fmt: skip
    sink = KafkaEventSink(broker.bootstrap_servers, topics.events, settings.broker)
    try:
        # In the log: six records before offset 6 on the key partition are skipped (the
        # archive holds up to offset 5), the one after is read.
        for n in range(7):
            event = issued(f"key-log-{n}")
            await sink.send([(RECORD_KEY, encode(event), None)], "a key event")
        follower = KeyService(settings, None, AsyncStore(store), broker.bootstrap_servers)
        async with follower.following():
            await _wait(lambda: follower.ring.get("key-log-6") is not None, "the log's key")
        assert follower.ring.get("key-archived") is not None
        assert follower.ring.get("key-log-5") is None  # before the archive's end: not re-read
    finally:
        await sink.stop()
