"""The audit chain (pure): chaining, and verify naming what was altered, removed or moved."""

from __future__ import annotations

import msgspec

from events import MessageReceived
from events.chain import chain, event_hash, on_chain, payload_digest, verify_stream
from tests.factories import make_event


def stream(n: int = 5) -> list:  # type: ignore[type-arg]
    return chain(make_event("ctx-1", v, n=v) for v in range(1, n + 1))


def check(events: list) -> list:  # type: ignore[type-arg]
    return verify_stream("ctx-1", [(e, None) for e in events])


def test_a_chained_stream_verifies() -> None:
    events = stream()
    assert events[0].prev_hash == "" and all(e.prev_hash for e in events[1:])
    assert check(events) == []


def test_an_altered_event_is_named() -> None:
    events = stream()
    altered = msgspec.structs.replace(
        events[2], payload=MessageReceived(message_id="m3", content="something else")
    )
    (found,) = check([*events[:2], altered, *events[3:]])
    assert (found.stream_version, found.event_id) == (3, events[2].event_id)
    assert "altered" in found.problem


def test_a_removed_event_is_named() -> None:
    events = stream()
    (found,) = check(events[:1] + events[2:])
    assert found.stream_version == 3 and "version 2 is missing" in found.problem


def test_reordered_events_are_named() -> None:
    events = stream()
    found = check([events[0], events[2], events[1], *events[3:]])
    # Named as what it is, once, at the event that came early; nothing called missing or
    # altered (every version is there, each chained to the one before it).
    assert [(b.stream_version, b.problem) for b in found] == [
        (3, "out of order: version 3 comes before version 2")
    ]


def forged_at(events: list, version: int) -> object:  # type: ignore[type-arg]
    """What a foreign producer writes at `version`: a well-formed event, chained to the
    owner's previous event (anyone who reads the log can compute that hash)."""
    text = MessageReceived(message_id="mx", content="forged")
    (forged,) = chain(
        [make_event("ctx-1", version, text, n=100)], prev_hash=event_hash(events[version - 2])
    )
    return forged


def test_a_foreign_event_at_the_owners_version_is_named_not_the_owners() -> None:
    events = stream()
    forged = forged_at(events, 4)
    # The forger's event is logged first; the owner wrote its own version 4 after it and
    # went on from its own (version 5 links to the owner's 4).
    logged = [*events[:3], forged, *events[3:]]
    (found,) = check(logged)
    assert (found.stream_version, found.event_id) == (4, forged.event_id)  # type: ignore[attr-defined]
    assert found.problem.startswith("foreign: a second event claims version 4")
    kept, foreign = on_chain([(e, None) for e in logged])
    assert [e for e, _ in kept] == events and foreign == [forged]


def test_a_producer_retry_is_not_a_foreign_event() -> None:
    events = stream()
    assert check([*events[:3], events[3], events[3], *events[4:]]) == []


def test_erased_content_still_verifies_with_its_kept_digest() -> None:
    events = stream()
    digest = payload_digest(events[1])
    erased = msgspec.structs.replace(
        events[1], payload=MessageReceived(message_id="m2", content="")
    )
    pairs = [(e, None) for e in events]
    pairs[1] = (erased, digest)
    assert verify_stream("ctx-1", pairs) == []
    pairs[1] = (erased, None)  # without the digest, the erasure looks like an alteration
    assert verify_stream("ctx-1", pairs)
