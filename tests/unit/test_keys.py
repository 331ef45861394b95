"""The key ring (actors/keys.py): issue, rotate with a grace period, revoke, expire; the
time is always passed in."""

from __future__ import annotations

from datetime import timedelta

from actors.keys import Key, KeyRing, Refused, config_key_id, hash_key
from events import KeyIssued, KeyRevoked, KeyRotated
from tests.factories import BASE_TIME, make_event


def issued(n: int, key_id: str, secret: str, **extra: object) -> object:
    payload = KeyIssued(key_id=key_id, sha256=hash_key(secret), user="ann", **extra)  # type: ignore[arg-type]
    return make_event(f"keys:{n}", 1, payload, n=n, tenant_id="acme")


def test_an_issued_key_is_known_by_its_hash_with_its_tenant_user_and_scopes() -> None:
    ring = KeyRing()
    assert ring.apply(issued(1, "k1", "secret-1", scopes=("chat",)))  # type: ignore[arg-type]
    key = ring.check(hash_key("secret-1"), BASE_TIME)
    assert isinstance(key, Key)
    assert (key.tenant, key.user, key.scopes) == ("acme", "ann", ("chat",))
    assert ring.check(hash_key("another"), BASE_TIME) is None


def test_apply_is_idempotent_by_event_id() -> None:
    ring = KeyRing()
    event = issued(1, "k1", "s")
    assert ring.apply(event) is True  # type: ignore[arg-type]
    revoke = make_event("keys:2", 1, KeyRevoked(key_id="k1"), n=2, tenant_id="acme")
    assert ring.apply(revoke)
    assert ring.apply(event) is False  # type: ignore[arg-type]  # a re-read does not un-revoke
    assert isinstance(ring.check(hash_key("s"), BASE_TIME), Refused)


def test_a_rotated_key_works_until_the_grace_ends_and_then_names_its_expiry() -> None:
    ring = KeyRing()
    ring.apply(issued(1, "old", "old-secret"))  # type: ignore[arg-type]
    ring.apply(issued(2, "new", "new-secret", replaces="old"))  # type: ignore[arg-type]
    grace = BASE_TIME + timedelta(hours=24)
    rotate = KeyRotated(key_id="old", successor="new", grace_until=grace)
    ring.apply(make_event("keys:3", 1, rotate, n=3, tenant_id="acme"))
    assert isinstance(ring.check(hash_key("old-secret"), grace - timedelta(seconds=1)), Key)
    refused = ring.check(hash_key("old-secret"), grace)
    assert isinstance(refused, Refused) and refused.code == "expired_api_key"
    assert "expired at 2026-01-02T00:00:00Z" in refused.message and "new" in refused.message
    assert isinstance(ring.check(hash_key("new-secret"), grace), Key)


def test_a_rotation_never_extends_an_earlier_expiry() -> None:
    ring = KeyRing()
    soon = BASE_TIME + timedelta(hours=1)
    ring.apply(issued(1, "k", "s", expires_at=soon))  # type: ignore[arg-type]
    rotate = KeyRotated(key_id="k", successor="k2", grace_until=BASE_TIME + timedelta(days=1))
    ring.apply(make_event("keys:2", 1, rotate, n=2, tenant_id="acme"))
    assert isinstance(ring.check(hash_key("s"), soon), Refused)


def test_a_revoked_key_is_refused_with_the_reason() -> None:
    ring = KeyRing()
    ring.apply(issued(1, "k", "s"))  # type: ignore[arg-type]
    revoke = KeyRevoked(key_id="k", revoked_by="root", reason="lost laptop")
    ring.apply(make_event("keys:2", 1, revoke, n=2, tenant_id="acme"))
    refused = ring.check(hash_key("s"), BASE_TIME)
    assert isinstance(refused, Refused) and refused.code == "revoked_api_key"
    assert "lost laptop" in refused.message
    assert ring.get("k").revoked_by == "root"  # type: ignore[union-attr]


def test_config_keys_are_a_bootstrap_that_events_can_revoke() -> None:
    digest = hash_key("from-config")
    ring = KeyRing([Key(key_id=config_key_id(digest), sha256=digest, tenant="t", user="u",
                        source="config")])  # fmt: skip
    assert isinstance(ring.check(digest, BASE_TIME), Key)
    revoke = KeyRevoked(key_id=config_key_id(digest))
    ring.apply(make_event("keys:1", 1, revoke, n=1, tenant_id="t"))
    assert isinstance(ring.check(digest, BASE_TIME), Refused)
