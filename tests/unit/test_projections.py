"""The read-side projector and its fold: pure functions over plain lists of events."""

from __future__ import annotations

from datetime import timedelta

from events import FeedbackGiven, MemoryPruned, TagsChanged
from streams.projections import (
    FACTS_TABLE,
    PRUNES_TABLE,
    FactRow,
    fold,
    follow_up_kind,
    project,
    topic_of,
)
from tests.factories import BASE_TIME, make_event, make_turn


def test_a_turn_projects_one_fact_per_event_with_its_numbers() -> None:
    turn = make_turn(1, latency_ms=42.0)
    rows = [project(e) for e in turn]
    assert all(isinstance(r, FactRow) for r in rows)
    facts = {r.type: r for r in rows if isinstance(r, FactRow)}
    reply = facts["ReplyCompleted"]
    assert (reply.latency_ms, reply.prompt_tokens, reply.completion_tokens) == (42.0, 7, 2)
    assert reply.conversation_id == "turn-1" and reply.model == "demo-1" and reply.status == "ok"
    question = facts["MessageReceived"]
    assert question.text == "What is the capital of Portugal?" and question.topic == "knowledge"
    assert question.follow_up == "new_question"  # counted only if not the context's first
    assert facts["RateLimitChecked"].status == "allowed"


def test_failures_and_denials_carry_their_class() -> None:
    failed = {e.type: project(e) for e in make_turn(2, outcome="failed")}
    assert failed["ReplyFailed"].status == "failed"  # type: ignore[union-attr]
    assert failed["ModelCalled"].error_class == "network"  # type: ignore[union-attr]
    denied = [project(e) for e in make_turn(3, outcome="denied")]
    assert [r.status for r in denied if r is not None][-1] == "denied"  # type: ignore[union-attr]


def test_classifiers_are_deterministic() -> None:
    assert topic_of("Why does my python function raise an exception?") == "code"
    assert topic_of("solve 3 * 4 + 2") == "math"
    assert topic_of("hello there") == "general"
    assert follow_up_kind("thanks, that helps") == "thanks"
    assert follow_up_kind("can you give me an example?") == "elaboration"
    assert follow_up_kind("why is that?") == "clarification"
    assert follow_up_kind("what about Spain") == "new_question"


def test_fold_is_idempotent_and_order_free() -> None:
    events = make_turn(1) + make_turn(2, version=9)
    once = fold(events)
    assert fold(list(reversed(events)) + events[:3]) == once
    assert len(once[FACTS_TABLE]) == len(events)


def test_a_prune_redacts_memory_older_than_its_cutoff_but_keeps_the_numbers() -> None:
    old = make_turn(1)
    new = make_turn(100, version=9)
    cutoff = BASE_TIME + timedelta(seconds=50)
    prune = make_event(
        "memory-prune:1", 1, MemoryPruned(before=cutoff, max_age_days=30, entries=1), n=5000
    )
    tables = fold([*old, prune, *new])
    facts = tables[FACTS_TABLE]
    old_reply = facts[old[-1].event_id]
    assert isinstance(old_reply, FactRow)
    assert old_reply.text == "" and old_reply.redacted == 1 and old_reply.latency_ms == 12.0
    new_reply = facts[new[-1].event_id]
    assert isinstance(new_reply, FactRow) and new_reply.text == "Lisbon."
    assert len(tables[PRUNES_TABLE]) == 1
    # Another tenant's memory is untouched.
    other = make_turn(7, tenant_id="t2")
    assert all(
        isinstance(r, FactRow) and r.redacted == 0
        for r in fold([*other, prune])[FACTS_TABLE].values()
    )


def test_feedback_and_tags_are_facts() -> None:
    feedback = project(
        make_event("c", 3, FeedbackGiven(message_id="r1", rating=4, reason="good"), n=9)
    )
    assert isinstance(feedback, FactRow) and feedback.rating == 4 and feedback.text == "good"
    tags = project(make_event("c", 4, TagsChanged(added=("a",), removed=("b",)), n=10))
    assert isinstance(tags, FactRow) and tags.tags_added == ("a",) and tags.tags_removed == ("b",)
