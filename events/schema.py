"""JSON Schema of every event, generated from the types (checked in as docs/events.schema.json)."""

from __future__ import annotations

from typing import Any

import msgspec

from events.codec import registered_types
from events.envelope import Envelope
from events.types import CURRENT_SCHEMA


def event_json_schema() -> dict[str, Any]:
    """One schema: a oneOf over every event type, each pinning its `type` name."""
    types = registered_types()
    envelopes = [Envelope[cls] for cls in types.values()]  # type: ignore[valid-type]
    refs, components = msgspec.json.schema_components(envelopes, ref_template="#/$defs/{name}")
    one_of = []
    for (name, cls), ref in zip(types.items(), refs, strict=True):
        key = ref["$ref"].rsplit("/", 1)[1]
        props = components[key]["properties"]
        props["type"] = {"const": name}
        # Readers accept any schema >= 1: older ones are upcast, newer ones only add fields.
        props["schema"] = {"type": "integer", "minimum": 1, "default": CURRENT_SCHEMA[cls]}
        components[key]["title"] = f"{name} event"
        one_of.append(ref)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "chat-llm event",
        "description": "An event on the chatllm.events / chatllm.ingest topics (JSON, UTF-8).",
        "oneOf": one_of,
        "$defs": components,
    }


def render() -> str:
    """The schema as pretty, stable JSON text."""
    return msgspec.json.format(msgspec.json.encode(event_json_schema()), indent=2).decode() + "\n"


def render_observations() -> str:
    """The observations topic's record schema (events/observations.py), as render() does."""
    from events.observations import observation_json_schema

    schema = observation_json_schema()
    return msgspec.json.format(msgspec.json.encode(schema), indent=2).decode() + "\n"


def main(argv: list[str] | None = None) -> int:
    """Print the schema (with --observations: the observation records'), or with --check FILE
    fail if FILE is not up to date."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    text = render
    if args[:1] == ["--observations"]:
        args, text = args[1:], render_observations
    if args[:1] == ["--check"]:
        with open(args[1], encoding="utf-8") as fh:
            if fh.read() != text():
                print(f"{args[1]} is out of date: run `make schema`", file=sys.stderr)
                return 1
        return 0
    sys.stdout.write(text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
