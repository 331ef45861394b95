"""The audit chain: each event carries the hash of its stream's previous event.

An event's hash covers its envelope (prev_hash included) and a digest of its payload, not
the payload itself: when a user's content is erased (a data-protection request), the
archive keeps the payload's digest beside the erased body, and the chain still verifies.
Altering, removing or reordering an event breaks the chain at that event.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from events.envelope import Envelope

_encoder = msgspec.json.Encoder()


def payload_digest(event: Envelope[Any]) -> str:
    """SHA-256 of the payload's canonical JSON."""
    return hashlib.sha256(_encoder.encode(event.payload)).hexdigest()


def event_hash(event: Envelope[Any], digest: str | None = None) -> str:
    """SHA-256 of the envelope (without the payload) and the payload's digest; `digest`
    stands in for a payload that was erased."""
    head = _encoder.encode(msgspec.structs.replace(event, payload=None))
    body = digest if digest is not None else payload_digest(event)
    return hashlib.sha256(head + b"\n" + body.encode()).hexdigest()


def chain(events: Iterable[Envelope[Any]], prev_hash: str = "") -> list[Envelope[Any]]:
    """The events (one stream, in order) with each prev_hash set, after `prev_hash`."""
    out = []
    for event in events:
        event = msgspec.structs.replace(event, prev_hash=prev_hash)
        prev_hash = event_hash(event)
        out.append(event)
    return out


@dataclass(frozen=True)
class Break:
    """Where a stream's chain does not hold, and why."""

    stream_id: str
    stream_version: int
    event_id: str
    problem: str


def on_chain(
    events: Sequence[tuple[Envelope[Any], str | None]],
) -> tuple[list[tuple[Envelope[Any], str | None]], list[Envelope[Any]]]:
    """Split one stream's events (in log order, with their erased digests) into the chain
    its writer wrote and the foreign events beside it: a second event that claims a
    version already taken (a writer that is not the stream's owner) is foreign unless it
    is the one the chain goes on from. At each version the kept event is the one linked to
    the kept event before it, and, among several so linked, the one the next version links
    to (else the first logged). A repeat of the same event_id (a producer retry) is neither."""
    by_version: dict[int, list[tuple[Envelope[Any], str | None]]] = {}
    for event, digest in events:
        same = by_version.setdefault(event.stream_version, [])
        if all(e.event_id != event.event_id for e, _ in same):
            same.append((event, digest))
    chosen: dict[int, str] = {}  # version -> the kept event's id
    foreign: list[Envelope[Any]] = []
    prev: str | None = None
    for version in sorted(by_version):
        candidates = by_version[version]
        choice = candidates[0]
        if len(candidates) > 1:
            linked = [c for c in candidates if prev is None or c[0].prev_hash == prev] or candidates
            following = {e.prev_hash for e, _ in by_version.get(version + 1, [])}
            choice = next((c for c in linked if event_hash(*c) in following), linked[0])
            foreign += [e for e, _ in candidates if e.event_id != choice[0].event_id]
        chosen[version] = choice[0].event_id
        prev = event_hash(*choice)
    # The kept events in the order given (a reordering stays visible to verify_stream).
    kept, seen = [], set()
    for event, digest in events:
        if chosen.get(event.stream_version) == event.event_id and event.event_id not in seen:
            seen.add(event.event_id)
            kept.append((event, digest))
    return kept, foreign


def verify_stream(
    stream_id: str, events: Iterable[tuple[Envelope[Any], str | None]]
) -> list[Break]:
    """Check one stream's events (in version order, each with the digest kept for an erased
    payload, or None): versions gapless from 1, each prev_hash the hash of the previous.
    A foreign event at a version the owner wrote (see on_chain) is named as such."""
    kept, foreign = on_chain(list(events))
    breaks: list[Break] = [
        Break(
            stream_id,
            e.stream_version,
            e.event_id,
            f"foreign: a second event claims version {e.stream_version}, off the stream's"
            " chain (written by someone other than the stream's owner)",
        )
        for e in foreign
    ]
    # In log order: each version once, none missing, none before an earlier one.
    present = {e.stream_version for e, _ in kept}
    absent = sorted(set(range(1, max(present, default=0) + 1)) - present)
    seen: set[int] = set()
    first: dict[int, tuple[Envelope[Any], str | None]] = {}
    for event, digest in kept:
        v = event.stream_version
        if v in seen:
            breaks.append(Break(stream_id, v, event.event_id, f"version {v} appears again"))
            continue
        seen.add(v)
        first[v] = (event, digest)
        while absent and absent[0] < v:
            breaks.append(
                Break(stream_id, v, event.event_id, f"version {absent.pop(0)} is missing")
            )
        before = next((u for u in range(1, v) if u in present and u not in seen), None)
        if before is not None:
            early = f"out of order: version {v} comes before version {before}"
            breaks.append(Break(stream_id, v, event.event_id, early))
    # In version order: each event chained to the one before it.
    for v in sorted(first):
        event, _ = first[v]
        if v == 1 and event.prev_hash:
            orphan = "the first event has a prev_hash (events before it are missing)"
            breaks.append(Break(stream_id, 1, event.event_id, orphan))
        elif v - 1 in first and event.prev_hash != event_hash(*first[v - 1]):
            # The previous event is not what this one was chained to: it was altered.
            before_event = first[v - 1][0]
            breaks.append(Break(stream_id, v - 1, before_event.event_id,
                                f"altered: version {v}'s prev_hash does not match it"))  # fmt: skip
    return breaks
