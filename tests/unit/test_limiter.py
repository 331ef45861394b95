"""Exact rate limits on an injected clock: windows, burst, adaptive factor, replay."""

from __future__ import annotations

from actors.limiter import LimitPolicy, RateLimiter
from events import RateAdjusted


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def test_user_limit_over_a_moving_window() -> None:
    clock = Clock()
    limiter = RateLimiter(LimitPolicy(user="3/minute", tenant="", rate_per_s=0), clock)
    assert [limiter.check("t", "alice").allowed for _ in range(4)] == [True, True, True, False]
    # Another user of the same tenant has a budget of their own.
    assert limiter.check("t", "bob").allowed
    denied = limiter.check("t", "alice")
    assert denied.limit == "user:3 per 1 minute" and 59 < denied.retry_after_s <= 60
    clock.t += 30
    assert not limiter.check("t", "alice").allowed  # moving, not fixed: still 3 in the last minute
    clock.t += 31
    assert limiter.check("t", "alice").allowed


def test_tenant_limit_spans_users_and_a_denial_consumes_nothing() -> None:
    limiter = RateLimiter(LimitPolicy(user="2/hour", tenant="3/hour", rate_per_s=0), Clock())
    results = [limiter.check("t", user).allowed for user in ("a", "a", "a", "b", "c")]
    # a, a pass; a is denied by its user limit (tenant not charged); b passes; c: tenant full.
    assert results == [True, True, False, True, False]
    assert limiter.check("t", "c").limit == "tenant:3 per 1 hour"


def test_rate_with_burst() -> None:
    clock = Clock()
    limiter = RateLimiter(LimitPolicy(user="", tenant="", rate_per_s=10, burst=20), clock)
    assert sum(limiter.check("t", "u").allowed for _ in range(50)) == 20  # the burst
    clock.t += 2.0  # the window (burst / rate) has passed
    assert sum(limiter.check("t", "u").allowed for _ in range(50)) == 20


def test_adaptive_rate_halves_on_429_and_recovers() -> None:
    clock = Clock()
    policy = LimitPolicy(
        user="", tenant="", rate_per_s=10, burst=10, recover_after=3, min_factor=0.25
    )
    limiter = RateLimiter(policy, clock)
    assert limiter.observe_upstream("rate_limited", 10) == RateAdjusted(
        factor=0.5, reason="upstream rate-limited"
    )
    assert limiter.observe_upstream("ok", 20_000).reason == "upstream slow"  # type: ignore[union-attr]
    assert limiter.observe_upstream("rate_limited", 10) is None  # already at the floor
    assert limiter.factor == 0.25
    assert sum(limiter.check("t", "u").allowed for _ in range(20)) == 2  # burst 10 x 0.25
    changes = [limiter.observe_upstream("ok", 5) for _ in range(3)]
    assert changes[-1] == RateAdjusted(factor=0.35, reason="upstream healthy")


def test_replaying_recorded_decisions_restores_the_windows() -> None:
    clock = Clock()
    policy = LimitPolicy(user="3/minute", tenant="", rate_per_s=0)
    live = RateLimiter(policy, clock)
    decisions = []
    for _ in range(3):
        decisions.append((clock.t, live.check("t", "u")))
        clock.t += 5
    # A fresh limiter (a restarted actor) replays the log at the recorded times.
    replay_clock = Clock()
    rebuilt = RateLimiter(policy, replay_clock)
    for at, decision in decisions:
        replay_clock.t = at
        rebuilt.replay(decision, "t", "u")
    replay_clock.t = clock.t
    assert not rebuilt.check("t", "u").allowed
    assert rebuilt.check("t", "u").retry_after_s == live.check("t", "u").retry_after_s
