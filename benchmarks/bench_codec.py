"""Event codec: encode + two-pass validated decode, against plain msgspec JSON of the same data."""

from __future__ import annotations

import msgspec

from benchmarks.common import Result, best_rate
from events import decode, encode
from tests.factories import make_event


def run(n: int = 50_000) -> list[Result]:
    events = [make_event(f"ctx-{i % 100}", i + 1, n=i + 1) for i in range(n)]
    wire = [encode(e) for e in events]
    as_dicts = [msgspec.json.decode(w) for w in wire]
    plain_encoder, plain_decoder = msgspec.json.Encoder(), msgspec.json.Decoder()

    def ours_encode() -> int:
        for event in events:
            encode(event)
        return n

    def plain_encode() -> int:
        for data in as_dicts:
            plain_encoder.encode(data)
        return n

    def ours_decode() -> int:
        for data in wire:
            decode(data)
        return n

    def plain_decode() -> int:
        for data in wire:
            plain_decoder.decode(data)
        return n

    return [
        Result(
            "encode event",
            "events/s",
            best_rate(ours_encode),
            "msgspec dict→JSON",
            best_rate(plain_encode),
        ),
        Result(
            "decode + validate event",
            "events/s",
            best_rate(ours_decode),
            "msgspec JSON→dict (no validation)",
            best_rate(plain_decode),
        ),
    ]
