"""Learned routing without I/O: feedback moves the greedy choice, exploration stays within
its bound, choices are reproducible, and a what-if replays the learning."""

from __future__ import annotations

from datetime import timedelta

from actors.bandit import LearningPolicy, QualityBandit, reward
from actors.router import Band, RoutingPolicy, default_deployments
from actors.whatif import WhatIfPolicy, whatif
from events import FeedbackGiven
from events.standalone import standalone
from tests.factories import BASE_TIME
from tests.unit.test_whatif import permissive, traffic


def feedback(model: str, thumbs: str, band: str = "simple") -> FeedbackGiven:
    return FeedbackGiven(message_id="r1", thumbs=thumbs, model=model, band=band)  # type: ignore[arg-type]


def test_rewards_from_thumbs_and_ratings() -> None:
    assert reward(FeedbackGiven(message_id="r", thumbs="up")) == 1.0
    assert reward(FeedbackGiven(message_id="r", rating=2)) == 0.0
    assert reward(FeedbackGiven(message_id="r", rating=3, thumbs="up")) == 0.5
    assert reward(FeedbackGiven(message_id="r")) is None


def test_feedback_moves_the_choice_and_exploration_is_bounded() -> None:
    bandit = QualityBandit(LearningPolicy(enabled=True, max_explore=0.1))
    candidates = ["fast", "good"]
    chosen = [bandit.choose("t", "simple", candidates, f"m{i}")[0] for i in range(1000)]
    assert chosen.count("fast") >= 900  # no feedback: the first candidate, bar exploration
    for _ in range(20):
        bandit.learn("t", feedback("good", "up"))
        bandit.learn("t", feedback("fast", "down"))
    bandit.learn("other", feedback("fast", "up"))  # another tenant's feedback stays theirs
    chosen = [bandit.choose("t", "simple", candidates, f"m{i}")[0] for i in range(1000)]
    assert chosen.count("good") >= 900
    assert bandit.choose("t", "simple", candidates, "m7") == bandit.choose(
        "t", "simple", candidates, "m7"
    )
    assert bandit.choose("t", "complex", candidates, "m1")[1] == {"fast": 0.5, "good": 0.5}


def test_a_whatif_with_learned_routing_learns_from_the_recorded_feedback() -> None:
    band = Band(
        name="all", max_complexity=1.0, model="demo-fast", candidates=("demo-fast", "demo-1")
    )
    learning = RoutingPolicy(
        bands=(band,), sticky=False, learning=LearningPolicy(enabled=True, max_explore=0.0)
    )
    policy = WhatIfPolicy(limits=permissive(), routing=learning, deployments=default_deployments())
    recorded = traffic()
    # No feedback: the band's table model.
    report = whatif(recorded, policy, default_deployments())["t1"]
    assert report["whatif"]["models"] == {"demo-fast": 20}
    # Feedback before the traffic that likes demo-1 in this band: the what-if follows it.
    liked = [
        standalone(
            feedback("demo-1", "up", band="all"),
            event_id=f"01900000-0000-7000-8000-{n:012d}",
            tenant_id="t1",
            user_id="u1",
            occurred_at=BASE_TIME - timedelta(seconds=1),
            stream="fb",
        )
        for n in range(3)
    ]
    report = whatif([*liked, *recorded], policy, default_deployments())["t1"]
    assert report["whatif"]["models"] == {"demo-1": 20}
