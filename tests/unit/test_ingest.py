"""What makes an upstream record an event of the log (pure)."""

from __future__ import annotations

import pytest

from events import DecodeError, encode
from streams.ingest import tenant_hint, validate
from tests.factories import make_event


def test_a_valid_upstream_event_passes() -> None:
    event = make_event("ext:crm-1", 1, n=1)
    assert validate(encode(event)) == event
    assert validate(encode(make_event("crm:1", 1, n=2)), prefixes=("crm:",)).stream_id == "crm:1"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"", "empty record"),
        (b"{nope", "malformed envelope"),
        (encode(make_event("ctx-1", 1, n=3)), "is not an upstream stream"),
        (encode(make_event("ext:x", 1, n=4, tenant_id="")), "$.tenant_id"),
    ],
)
def test_what_is_rejected_says_why(value: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as caught:
        validate(value)
    assert reason in caught.value.reason


def test_the_tenant_of_a_bad_record_is_read_when_it_can_be() -> None:
    assert tenant_hint(b'{"tenant_id": "acme", "junk": 1}') == "acme"
    assert tenant_hint(b"not json") == "" and tenant_hint(None) == ""
