"""The event codec: round trips, clear rejections, schema evolution, the checked-in schema."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from events import (
    CURRENT_SCHEMA,
    ContextCreated,
    DecodeError,
    MessageReceived,
    ReplyCompleted,
    ReplyFailed,
    ToolCall,
    decode,
    encode,
    registered_types,
)
from events import upcasters as upcaster_module
from events.schema import render
from tests.factories import make_event

ROOT = Path(__file__).resolve().parents[2]

PAYLOADS = [
    ContextCreated(title="trip"),
    MessageReceived(message_id="m1", content="héllo ✓"),
    ReplyCompleted(message_id="r1", in_reply_to="m1", content="hi", model="demo-1", latency_ms=1.5),
    ReplyFailed(in_reply_to="m1", error_class="timeout", message="slow"),
    ReplyCompleted(
        message_id="r2",
        in_reply_to="m2",
        content="",
        model="demo-1",
        latency_ms=2.0,
        finish_reason="tool_calls",
        tool_calls=(ToolCall(id="call_1", name="lookup", arguments='{"q": "x"}'),),
    ),
    MessageReceived(message_id="m3", content='{"found": 1}', role="tool", tool_call_id="call_1"),
]


def sample(t: msgspec.inspect.Type) -> object:
    """A valid value of type `t`: every field filled, optional ones included."""
    mi = msgspec.inspect
    match t:
        case mi.StructType():
            return t.cls(**{f.name: sample(f.type) for f in t.fields})
        case mi.StrType(pattern=str(pattern)):
            value = {r"^[0-9a-f]{64}$": "ab" * 32}.get(pattern)
            assert value is not None, f"add a sample for the pattern {pattern}"
            return value
        case mi.StrType():
            return "x" * max(t.min_length or 1, 1)
        case mi.BoolType():
            return True
        case mi.IntType():
            return max(t.ge or 0, t.gt + 1 if t.gt is not None else 0, 1)
        case mi.FloatType():
            low = t.ge if t.ge is not None else (t.gt if t.gt is not None else 0.0)
            high = t.le if t.le is not None else (t.lt if t.lt is not None else low + 3.0)
            return (low + high) / 2  # inside the bounds, whichever the type sets
        case mi.BytesType():
            return b"%PDF-1.4 bytes"
        case mi.DateTimeType():
            from tests.factories import BASE_TIME

            return BASE_TIME
        case mi.LiteralType():
            return t.values[-1]
        case mi.UnionType():
            return sample(next(x for x in t.types if not isinstance(x, mi.NoneType)))
        case mi.TupleType() | mi.VarTupleType() | mi.ListType():
            item = t.item_type if hasattr(t, "item_type") else t.item_types[0]
            return (sample(item),)
        case mi.DictType():
            return {"k": sample(t.value_type)}
        case mi.AnyType():
            return {"any": [1, "two"]}
    raise AssertionError(f"no sample for {t}")


@pytest.mark.parametrize("name", sorted(registered_types()))
def test_every_registered_type_round_trips_with_every_field_set(name: str) -> None:
    """Generated from the registry: a new type is covered without editing this test."""
    cls = registered_types()[name]
    payload = sample(msgspec.inspect.type_info(cls))
    event = make_event(payload=payload)  # type: ignore[arg-type]
    wire = encode(event)
    as_json = json.loads(wire)
    assert as_json["type"] == name
    assert as_json["payload"] == json.loads(msgspec.json.encode(payload))
    assert decode(wire) == event


@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda p: type(p).__name__)
def test_every_type_round_trips_through_json(payload: object) -> None:
    event = make_event(payload=payload)  # type: ignore[arg-type]
    wire = encode(event)
    # Plain JSON: any Kafka client can read it, and the type name sits at the top.
    as_json = json.loads(wire)
    assert as_json["type"] == type(payload).__name__
    assert as_json["payload"] == json.loads(msgspec.json.encode(payload))
    assert decode(wire) == event


def test_every_registered_type_has_a_schema_version() -> None:
    assert set(registered_types().values()) == set(CURRENT_SCHEMA)


def _wire(**changes: object) -> bytes:
    data = json.loads(encode(make_event()))
    data.update(changes)
    return json.dumps(data).encode()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"not json", "malformed envelope"),
        (b"[1,2]", "malformed envelope"),
        (_wire(type="PizzaOrdered"), "unknown event type 'PizzaOrdered'"),
        (_wire(event_id="not-a-uuid"), "$.event_id"),
        (_wire(event_id="0190a0a0-0000-4000-8000-000000000000"), "$.event_id"),  # v4, not v7
        (_wire(stream_version=0), "$.stream_version"),
        (_wire(trace_id="xyz"), "$.trace_id"),
        (_wire(occurred_at="2026-01-01T00:00:00"), "$.occurred_at"),  # no zone
        (_wire(occurred_at="2026-01-01T01:00:00+01:00"), "must be UTC"),
        (_wire(payload={"message_id": "m1"}), "malformed MessageReceived payload"),
        (_wire(payload={"message_id": "m1", "content": 3}), "$.content"),
        (b"\xff\xfe", "malformed envelope"),
    ],
)
def test_malformed_events_are_rejected_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode(data)
    assert reason in info.value.reason


def test_missing_envelope_field_is_named() -> None:
    data = json.loads(encode(make_event()))
    del data["tenant_id"]
    with pytest.raises(DecodeError, match="tenant_id"):
        decode(json.dumps(data))


def test_a_newer_schema_with_extra_fields_is_still_read() -> None:
    # Schemas only grow: a newer writer's extra field is ignored by an older reader.
    data = json.loads(encode(make_event()))
    data["schema"] = 7
    data["payload"]["language"] = "pt"
    event = decode(json.dumps(data))
    assert isinstance(event.payload, MessageReceived)
    assert event.schema == 7


def test_an_older_schema_is_upcast(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pretend MessageReceived v2 renamed `text` (v1) to `content`, with its upcaster.
    monkeypatch.setitem(CURRENT_SCHEMA, MessageReceived, 2)

    def v1_to_v2(payload: dict[str, object]) -> dict[str, object]:
        payload = dict(payload)
        payload["content"] = payload.pop("text")
        return payload

    monkeypatch.setitem(upcaster_module.UPCASTERS, ("MessageReceived", 1), v1_to_v2)
    data = json.loads(encode(make_event()))
    data["schema"] = 1
    data["payload"] = {"message_id": "m1", "text": "old words"}
    event = decode(json.dumps(data))
    assert event.payload == MessageReceived(message_id="m1", content="old words")


def test_a_missing_upcaster_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(CURRENT_SCHEMA, MessageReceived, 3)
    data = json.loads(encode(make_event()))
    data["schema"] = 2
    with pytest.raises(DecodeError, match="no upcaster for MessageReceived schema 2 -> 3"):
        decode(json.dumps(data))


def test_encode_refuses_an_envelope_whose_type_lies() -> None:
    event = msgspec.structs.replace(make_event(), type="ReplyCompleted")
    with pytest.raises(ValueError, match="does not match payload"):
        encode(event)


def test_checked_in_json_schema_is_current() -> None:
    assert (ROOT / "docs" / "events.schema.json").read_text() == render()


def test_json_schema_names_every_type() -> None:
    schema = json.loads(render())
    consts = {
        schema["$defs"][ref["$ref"].rsplit("/", 1)[1]]["properties"]["type"]["const"]
        for ref in schema["oneOf"]
    }
    assert consts == set(registered_types())


def test_the_readme_lists_every_registered_event_type() -> None:
    """The README's list of types is generated from the registry (`make schema`): a new
    type, or a changed docstring, shows up there or this fails (issue 23, item 11)."""
    from pathlib import Path

    from events.schema import with_types

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert with_types(readme) == readme, "README.md's event types are stale: make schema"
    for name in registered_types():
        assert f"- `{name}`" in readme
