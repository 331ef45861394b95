"""API keys as an event-sourced aggregate: the key ring every API process folds from the
log (KeyIssued, KeyRotated, KeyRevoked), with the config file's keys as a bootstrap.

Pure: no I/O, and the time is always passed in (`now`), so expiry and rotation grace are
tested with any clock. The ring holds hashes, never keys.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

import msgspec

from events import Envelope, KeyIssued, KeyRevoked, KeyRotated

KEY_EVENTS = (KeyIssued, KeyRotated, KeyRevoked)
KEYS_STREAM = "keys"
"""Key events are standalone streams `keys:<event_id>`, and the log's records carry the
key `keys`: all of them on one partition, which the API processes follow."""


class Key(msgspec.Struct, frozen=True, kw_only=True):
    """One key as the ring knows it."""

    key_id: str
    sha256: str
    tenant: str
    user: str
    name: str = ""
    scopes: tuple[str, ...] = ("chat", "query")
    limit: str = ""
    expires_at: datetime | None = None
    issued_at: datetime | None = None
    issued_by: str = ""
    source: str = "log"
    """`log` (issued through chat-llm) or `config` (auth.keys, the bootstrap)."""
    replaces: str = ""
    successor: str = ""
    revoked_at: datetime | None = None
    revoked_by: str = ""
    reason: str = ""

    def status(self, now: datetime) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        if self.successor:
            return "rotating"
        return "active"


class Refused(msgspec.Struct, frozen=True):
    """Why a key that the ring knows may not be used: revoked or expired."""

    message: str
    code: str


def hash_key(key: str) -> str:
    """What the log and the config hold of a key: its SHA-256, hex."""
    return hashlib.sha256(key.encode()).hexdigest()


def config_key_id(sha256: str) -> str:
    """The id a config-file key is known by (its hash's first 12 digits)."""
    return f"cfg-{sha256[:12]}"


class KeyRing:
    """The keys, by id and by hash. `apply` is idempotent (by event id), so the process
    that writes an event may apply it at once and again when it follows the log."""

    def __init__(self, bootstrap: Iterable[Key] = ()) -> None:
        self._by_id: dict[str, Key] = {}
        self._by_hash: dict[str, str] = {}
        self._seen: set[str] = set()
        for key in bootstrap:
            self._put(key)

    def _put(self, key: Key) -> None:
        self._by_id[key.key_id] = key
        self._by_hash[key.sha256] = key.key_id

    def get(self, key_id: str) -> Key | None:
        return self._by_id.get(key_id)

    def keys(self, tenant: str | None = None) -> list[Key]:
        """Every key (of `tenant`), oldest first."""
        found = [k for k in self._by_id.values() if tenant is None or k.tenant == tenant]
        return sorted(found, key=lambda k: (k.issued_at is not None, k.issued_at, k.key_id))

    def apply(self, event: Envelope[Any]) -> bool:
        """Fold one event; False if it is not a key event or was applied before."""
        p = event.payload
        if not isinstance(p, KEY_EVENTS) or event.event_id in self._seen:
            return False
        self._seen.add(event.event_id)
        if isinstance(p, KeyIssued):
            issued = msgspec.structs.asdict(p) | {"scopes": tuple(p.scopes)}
            self._put(Key(tenant=event.tenant_id, issued_at=event.occurred_at, **issued))
            return True
        old = self._by_id.get(p.key_id)
        if old is None:
            return True  # about a key this ring never knew (another deployment's)
        if isinstance(p, KeyRotated):
            until = p.grace_until
            if old.expires_at is not None:
                until = min(until, old.expires_at)
            self._put(msgspec.structs.replace(old, successor=p.successor, expires_at=until))
        else:
            self._put(
                msgspec.structs.replace(
                    old, revoked_at=event.occurred_at, revoked_by=p.revoked_by, reason=p.reason
                )
            )
        return True

    def check(self, sha256: str, now: datetime) -> Key | Refused | None:
        """The key with this hash if it may be used now; Refused (revoked, expired) if the
        ring knows it but it may not; None if the ring does not know it."""
        key_id = self._by_hash.get(sha256)
        if key_id is None:
            return None
        key = self._by_id[key_id]
        if key.revoked_at is not None:
            return Refused(
                f"this API key was revoked at {_iso(key.revoked_at)}"
                + (f": {key.reason}" if key.reason else ""),
                "revoked_api_key",
            )
        if key.expires_at is not None and now >= key.expires_at:
            rotated = f" (rotated; use its successor {key.successor})" if key.successor else ""
            return Refused(
                f"this API key expired at {_iso(key.expires_at)}{rotated}", "expired_api_key"
            )
        return key


def grace_end(now: datetime, grace_s: float) -> datetime:
    return now + timedelta(seconds=grace_s)


def _iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")
