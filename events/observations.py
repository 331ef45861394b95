"""Observations: the compact facts the stateful detectors judge (not events of the log).

The archive writer, which decodes every event anyway, derives one observation per finished
turn (ReplyCompleted, ReplyFailed) and per limiter decision (RateLimitChecked), and the
memory sampler one per process sample. It publishes them in batches to their own topic
(`topics.OBSERVATIONS`): each record is a JSON array of observations, keyed by what a
detector groups on (`model:<model>`, `tenant:<tenant>` or `process:<name>`), so one
detector's state for one key lives on one partition and in one processor.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec


class Observation(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One fact for the detectors."""

    kind: Literal["turn", "limit", "memory"]
    at: datetime
    """Event time: when the turn finished, the decision was taken, the sample was read."""
    tenant_id: str
    subject: str = ""
    """turn: the model that answered; memory: the process."""
    context_id: str = ""
    latency_ms: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    failed: bool = False
    """turn: it ended in ReplyFailed."""
    denied: bool = False
    """limit: the request was denied."""
    rss_mb: Annotated[float, msgspec.Meta(ge=0)] = 0.0


MODEL, TENANT, PROCESS = "model:", "tenant:", "process:"
"""Record key prefixes: the latency detector's key, the rate detectors', the memory one's."""

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(list[Observation])


def encode_batch(observations: list[Observation]) -> bytes:
    return _encoder.encode(observations)


def decode_batch(data: bytes) -> list[Observation]:
    """Raises msgspec.DecodeError / ValidationError with the reason."""
    return _decoder.decode(data)


def keyed(observations: list[Observation]) -> dict[str, list[Observation]]:
    """The observations by record key, each key's in event-time order (a batch holds several
    partitions of the log, read one after the other): a turn goes to its model's batch
    (latency) and its tenant's (error rate); a limit decision to its tenant's; a sample to
    its process's."""
    out: dict[str, list[Observation]] = {}
    for o in observations:
        if o.kind == "turn":
            if not o.failed:
                out.setdefault(MODEL + o.subject, []).append(o)
            out.setdefault(TENANT + o.tenant_id, []).append(o)
        elif o.kind == "limit":
            out.setdefault(TENANT + o.tenant_id, []).append(o)
        else:
            out.setdefault(PROCESS + o.subject, []).append(o)
    for batch in out.values():
        batch.sort(key=lambda o: o.at)
    return out


def observation_json_schema() -> dict[str, object]:
    """The JSON Schema of one record's value: an array of observations."""
    (ref,), components = msgspec.json.schema_components(
        [list[Observation]], ref_template="#/$defs/{name}"
    )
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "chat-llm observations",
        "description": (
            "A record of the chatllm.observations topic (JSON, UTF-8): the observations of"
            " one key, in event time order. Keys: model:<model>, tenant:<tenant>,"
            " process:<name>."
        ),
        **ref,
        "$defs": components,
    }
