"""Time travel as a pure fold over plain lists of events."""

from __future__ import annotations

from datetime import timedelta

from actors.history import point_in_time
from events import CircuitChanged, RateAdjusted, TagsChanged
from tests.factories import BASE_TIME, make_event, make_turn


def test_the_context_as_it_was_at_each_moment() -> None:
    first = make_turn(1, version=1)  # at BASE_TIME + 1 s
    second = make_turn(5, version=len(first) + 1, question="And Spain?")  # + 5 s
    tags = make_event("ctx-1", len(first) + len(second) + 1, TagsChanged(added=("vip",)), n=9)
    events = first + second + [tags]
    tenant = [
        make_event(
            "ctx-x",
            1,
            CircuitChanged(deployment="demo-1-a", from_state="closed", to_state="open"),
            n=3,
        ),
        make_event("ctx-x", 2, RateAdjusted(factor=0.5, reason="429s"), n=4),
    ]
    early = point_in_time("ctx-1", BASE_TIME + timedelta(seconds=2), events, first + tenant)
    assert [m.content for m in early.messages] == ["What is the capital of Portugal?", "Lisbon."]
    assert early.context.tags == () and early.router.circuits == {}
    assert early.limiter.last_decision is not None and early.limiter.rate_factor == 1.0
    assert early.router.sticky_model == "demo-1"

    later = point_in_time("ctx-1", BASE_TIME + timedelta(seconds=20), events, events + tenant)
    assert len(later.messages) == 4 and later.context.tags == ("vip",)
    assert later.router.circuits == {"demo-1-a": "open"}
    assert later.limiter.rate_factor == 1.0  # the later decision recorded the factor again
    assert later.limiter.decisions_last_hour == 2 and later.events == len(events)
