"""API keys as events: issue, rotate and revoke them through the log, and follow the log so
that every API process knows every key within a second of its change, with no restart.

Each key event is a standalone event (`keys:<event_id>`, in the key's tenant, archived and
audited like any other) whose record carries the key `keys`, so all of them sit on one
partition. At start an API process folds the archived key events, then follows that one
partition from just after the last of them (so nothing the archive has not caught up with
is missed); it reads only the record keys of the other streams on that partition.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Iterable
from datetime import datetime
from typing import Any

from actors.keys import KEYS_STREAM, Key, KeyRing, config_key_id, grace_end, hash_key
from events import DecodeError, KeyIssued, KeyRevoked, KeyRotated, decode, encode
from events.standalone import standalone
from infra.adapters.clickhouse.store import AsyncStore
from infra.adapters.clock import SystemClock
from infra.adapters.kafka.clients import KafkaEventSink, new_consumer, partition_for
from infra.config import ApiKey, Settings
from streams.loop import LoopHealth

log = logging.getLogger(__name__)

RECORD_KEY = KEYS_STREAM.encode()
KEY_PREFIX = "sk-chatllm-"


class UnknownKey(LookupError):
    """No such key in the caller's tenant."""


def config_keys(keys: Iterable[ApiKey]) -> list[Key]:
    """The config file's keys (auth.keys), as the ring's bootstrap."""
    return [
        Key(key_id=config_key_id(k.sha256), source="config", scopes=tuple(k.scopes),
            **{f: getattr(k, f) for f in ("sha256", "tenant", "user", "name", "limit")})
        for k in keys
    ]  # fmt: skip


def new_secret() -> str:
    """A new API key: 256 random bits, with a prefix that says what it is."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


class KeyService:
    """The key ring of this process, the commands that change it, and the follower that
    keeps it current."""

    def __init__(
        self,
        settings: Settings,
        sink: KafkaEventSink | None,
        store: AsyncStore | None,
        bootstrap_servers: str = "",
        clock: Any = None,
    ) -> None:
        self.settings = settings
        self.ring = KeyRing(config_keys(settings.auth.keys))
        self.clock = clock or SystemClock()
        self._sink = sink
        self._store = store
        self._bootstrap = bootstrap_servers
        self.last_used: dict[str, datetime] = {}
        self.health = LoopHealth(name="keys")
        self._fetched = asyncio.Event()  # set after each fetch (then re-armed)
        self._ready = asyncio.Event()  # set once the first fetch is done
        self._following = False
        self._warned = False
        self._done_began = 0.0

    # -- the commands -------------------------------------------------------------------

    async def _append(self, events: list[Any]) -> None:
        if self._sink is None:
            raise RuntimeError("keys are changed through a running chat-llm (no log here)")
        await self._sink.send([(RECORD_KEY, encode(e), None) for e in events], "key events")
        for event in events:  # read-your-writes in this process; the others follow the log
            self.ring.apply(event)

    def _event(self, payload: Any, tenant: str, by: str) -> Any:
        return standalone(
            payload,
            event_id=self.clock.new_event_id(),
            tenant_id=tenant,
            user_id=by or "operator",
            occurred_at=self.clock.now(),
            stream=KEYS_STREAM,
        )

    def _own(self, tenant: str, key_id: str) -> Key:
        key = self.ring.get(key_id)
        if key is None or key.tenant != tenant:
            raise UnknownKey(f"no key {key_id!r} in tenant {tenant!r}")
        return key

    def _issued(self, tenant: str, by: str, **fields: Any) -> tuple[str, Any]:
        secret = new_secret()
        key_id = "key-" + secrets.token_hex(6)
        payload = KeyIssued(key_id=key_id, sha256=hash_key(secret), issued_by=by, **fields)
        return secret, self._event(payload, tenant, by)

    async def issue(
        self,
        tenant: str,
        user: str,
        by: str,
        *,
        name: str = "",
        scopes: tuple[str, ...] = ("chat", "query"),
        limit: str = "",
        expires_at: datetime | None = None,
    ) -> tuple[str, Key]:
        """A new key: the key itself (shown once, never stored) and what the ring holds."""
        secret, event = self._issued(
            tenant, by, user=user, name=name, scopes=scopes, limit=limit, expires_at=expires_at
        )
        await self._append([event])
        key = self.ring.get(event.payload.key_id)
        assert key is not None
        return secret, key

    async def rotate(
        self, tenant: str, key_id: str, by: str, grace_s: float | None = None
    ) -> tuple[str, Key, Key]:
        """A successor for the key (same user, scopes, limit, expiry); the old one works
        until the grace period (auth.rotation_grace_s) ends. Returns the new key, the
        successor and the old key as the ring now holds them."""
        old = self._own(tenant, key_id)
        if old.revoked_at is not None:
            raise ValueError(f"key {key_id!r} is revoked; issue a new one instead")
        grace = self.settings.auth.rotation_grace_s if grace_s is None else grace_s
        secret, issued = self._issued(
            tenant,
            by,
            user=old.user,
            name=old.name,
            scopes=old.scopes,
            limit=old.limit,
            expires_at=old.expires_at,
            replaces=key_id,
        )
        rotated = self._event(
            KeyRotated(
                key_id=key_id,
                successor=issued.payload.key_id,
                grace_until=grace_end(self.clock.now(), grace),
                rotated_by=by,
            ),
            tenant,
            by,
        )
        await self._append([issued, rotated])
        successor, now_old = self.ring.get(issued.payload.key_id), self.ring.get(key_id)
        assert successor is not None and now_old is not None
        return secret, successor, now_old

    async def revoke(self, tenant: str, key_id: str, by: str, reason: str = "") -> Key:
        """Revoke the key: every API process refuses it once it has read the event."""
        self._own(tenant, key_id)
        await self._append([self._event(KeyRevoked(key_id=key_id, revoked_by=by, reason=reason),
                                         tenant, by)])  # fmt: skip
        key = self.ring.get(key_id)
        assert key is not None
        return key

    def shown(self, key: Key) -> dict[str, Any]:
        """One key as `key list` shows it: never the key, nor its hash; the last use this
        process saw."""
        return {
            "key_id": key.key_id,
            "name": key.name,
            "user": key.user,
            "scopes": list(key.scopes),
            "limit": key.limit,
            "status": key.status(self.clock.now()),
            "source": key.source,
            "issued_at": key.issued_at,
            "issued_by": key.issued_by,
            "expires_at": key.expires_at,
            "last_used_at": self.last_used.get(key.key_id),
            "replaces": key.replaces,
            "successor": key.successor,
            "revoked_by": key.revoked_by,
        }

    def listing(self, tenant: str) -> list[dict[str, Any]]:
        """The tenant's keys, oldest first, as `shown`."""
        return [self.shown(k) for k in self.ring.keys(tenant)]

    def used(self, key_id: str) -> None:
        self.last_used[key_id] = self.clock.now()

    # -- the follower -------------------------------------------------------------------

    async def caught_up(self, timeout_s: float = 1.0) -> None:
        """Wait until the follower has finished a fetch that began after this call (at most
        `timeout_s`): a key issued, and acknowledged by the log, before a request arrived
        is then known here. For a key this process does not know yet (issued through
        another API process a moment ago) before it is refused."""
        if not self._following:
            return
        asked = time.monotonic()
        deadline = asked + timeout_s
        while self._done_began < asked:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._fetched.wait(), left)

    @contextlib.asynccontextmanager
    async def following(self) -> AsyncIterator[None]:
        """Follow the key events for the duration of the block (the block does not wait for
        the first read: requests that present a key do, in `ready`)."""
        if not self._bootstrap:
            yield
            return
        task = asyncio.create_task(self._follow())
        self._following = True
        try:
            yield
        finally:
            self._following = False
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def ready(self, within_s: float = 15.0) -> None:
        """Wait until the archived keys and the log's are folded (a process that has just
        started may not know a revocation yet), at most `within_s`; then warn once."""
        if not self._following or self._ready.is_set():
            return
        try:
            await asyncio.wait_for(self._ready.wait(), within_s)
        except TimeoutError:
            if not self._warned:
                self._warned = True
                log.warning("the API keys were not all read within %.0f s: %s", within_s,
                            self.health.last_error or "the log is slow")  # fmt: skip

    async def _archived(self) -> int | None:
        """Fold the archived key events; the offset of the last (None: none archived)."""
        if self._store is None:
            return None
        topic = self.settings.topics.events
        bodies, last = await self._store.call_with(lambda s: s.key_events(topic))
        for body in bodies:
            with contextlib.suppress(DecodeError):
                self.ring.apply(decode(body.encode()))
        return last

    async def _follow(self) -> None:
        from aiokafka import TopicPartition

        topic = self.settings.topics.events
        while True:  # the archive or the broker may be starting too: retry until both answer
            try:
                last = await self._archived()
                break
            except Exception as exc:
                self.health.last_error = f"reading the archived key events: {exc!r}"
                await asyncio.sleep(1.0)
        consumer = new_consumer(
            bootstrap_servers=self._bootstrap,
            enable_auto_commit=False,
            fetch_max_wait_ms=200,
            client_id="chatllm-keys",
        )
        await consumer.start()
        try:
            while not (partitions := consumer.partitions_for_topic(topic)):
                await consumer.topics()  # a metadata refresh: the topic may not exist yet
                await asyncio.sleep(0.5)
            tp = TopicPartition(topic, partition_for(KEYS_STREAM, sorted(partitions)))
            consumer.assign([tp])
            if last is None:
                await consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, last + 1)
            self.health.running = True
            self.health.last_error = ""
            while True:
                began = time.monotonic()
                batches = await consumer.getmany(tp, timeout_ms=250, max_records=2000)
                for record in batches.get(tp, ()):
                    if record.key != RECORD_KEY:
                        continue
                    try:
                        self.ring.apply(decode(record.value))
                    except DecodeError as exc:
                        log.warning("key record %s is unreadable: %s", record.offset, exc)
                end = consumer.highwater(tp) or 0
                self.health.lag = max(end - await consumer.position(tp), 0)
                self._done_began = began
                if not batches or self.health.lag == 0:  # read up to the end once
                    self._ready.set()
                self._fetched.set()  # wake those waiting in caught_up(), then re-arm
                self._fetched = asyncio.Event()
        finally:
            self.health.running = False
            with contextlib.suppress(Exception):
                await consumer.stop()
