"""Upcasters turn an old schema's payload (as a plain dict) into the next schema's.

Register one per (type name, from_schema) when a type's CURRENT_SCHEMA is bumped;
decoding chains them until the payload reaches the current schema.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Payload = dict[str, Any]
Upcaster = Callable[[Payload], Payload]

UPCASTERS: dict[tuple[str, int], Upcaster] = {}


def upcast(type_name: str, schema: int, target: int, payload: Payload) -> Payload:
    """Apply the registered chain from `schema` up to `target`; KeyError names a missing link."""
    for version in range(schema, target):
        try:
            step = UPCASTERS[(type_name, version)]
        except KeyError:
            raise KeyError(
                f"no upcaster for {type_name} schema {version} -> {version + 1}"
            ) from None
        payload = step(payload)
    return payload
