"""Exact rate limits: per user and per tenant (moving windows, e.g. per hour and per day)
and a per-second rate with a burst, with an adaptive factor on that rate.

Built on the `limits` library's moving-window strategy, over a storage whose clock
is injected: live, it reads the wall clock; on rebuild or a what-if replay, it
reads the recorded events' times, so the same log gives the same decisions.
Exactness comes from the owner: one limiter per tenant shard, and check-then-hit
runs without a suspension point in between.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
from limits import RateLimitItem, parse_many
from limits.storage.base import MovingWindowSupport, Storage
from limits.strategies import MovingWindowRateLimiter

from events import RateAdjusted, RateLimitChecked


class LimitPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What the limiter enforces. Limit strings use the `limits` notation: "100/hour;1000/day"."""

    version: str = "1"
    user: str = "600/hour;5000/day"
    tenant: str = "20000/hour;200000/day"
    rate_per_s: float = 50.0
    """Sustained requests per second per tenant (0 disables the rate limit)."""
    burst: int = 100
    """Requests allowed at once above the sustained rate."""
    adaptive: bool = True
    min_factor: float = 0.1
    """The adaptive factor never lowers the rate below this fraction."""
    slow_ms: float = 10_000.0
    """An upstream reply slower than this counts as a slow-down signal."""
    recover_after: int = 20
    """Healthy upstream replies in a row before the factor is raised again."""
    strained_window_s: float = 60.0
    """A deployment counts as strained for this long after a 429 or a slow reply; the rate is
    lowered only while every deployment is (one provider's 429 is the router's to fail over,
    not a reason to turn the tenant's traffic away)."""


class ClockedMemoryStorage(Storage, MovingWindowSupport):
    """`limits` moving-window storage in memory, reading time from an injected clock."""

    STORAGE_SCHEME = ["chatllm-clocked"]  # noqa: RUF012 (declared by the base class)

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._events: dict[str, list[float]] = {}  # newest first: hit times
        self._counters: dict[str, tuple[int, float]] = {}  # fixed windows: (count, expires at)
        super().__init__(None)

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return ValueError

    def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        if amount > limit:
            return False
        now = self._clock()
        events = self._events.setdefault(key, [])
        self._expire(events, now, expiry)
        if len(events) + amount > limit:
            return False
        events[:0] = [now] * amount
        return True

    def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        now = self._clock()
        events = self._events.get(key, [])
        self._expire(events, now, expiry)
        if not events:
            return now, 0
        return events[-1], len(events)

    @staticmethod
    def _expire(events: list[float], now: float, expiry: int) -> None:
        # Newest first, so the expired ones are a suffix.
        keep = bisect.bisect_left([-t for t in events], -(now - expiry))
        del events[keep:]

    # The fixed-window half of the Storage interface, for the `limits` fixed-window strategies.
    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        now = self._clock()
        count, until = self._counters.get(key, (0, now + expiry))
        if until <= now:
            count, until = 0, now + expiry
        self._counters[key] = (count + amount, until)
        return count + amount

    def get(self, key: str) -> int:
        count, until = self._counters.get(key, (0, 0.0))
        return count if until > self._clock() else 0

    def get_expiry(self, key: str) -> float:
        return self._counters.get(key, (0, self._clock()))[1]

    def check(self) -> bool:
        return True

    def reset(self) -> int | None:
        count = len(self._events) + len(self._counters)
        self._events.clear()
        self._counters.clear()
        return count

    def clear(self, key: str) -> None:
        self._events.pop(key, None)
        self._counters.pop(key, None)


class RateLimiter:
    """The limits of every tenant and user of one shard."""

    def __init__(self, policy: LimitPolicy, clock: Callable[[], float]) -> None:
        self.policy = policy
        self._clock = clock
        self._strategy = MovingWindowRateLimiter(ClockedMemoryStorage(clock))
        self._user = parse_many(policy.user) if policy.user else []
        self._tenant = parse_many(policy.tenant) if policy.tenant else []
        self.factor = 1.0
        self._healthy = 0
        self._strained: dict[str, float] = {}
        """Deployment -> when it last said 429 or was slow."""

    def use(self, policy: LimitPolicy) -> None:
        """Switch to `policy`, keeping the windows counted so far (a switch is no reset)."""
        self.policy = policy
        self._user = parse_many(policy.user) if policy.user else []
        self._tenant = parse_many(policy.tenant) if policy.tenant else []

    def _rate_item(self) -> tuple[RateLimitItem, str] | None:
        p = self.policy
        if p.rate_per_s <= 0:
            return None
        # The adaptive factor scales the sustained rate and the burst alike.
        rate = max(p.rate_per_s * self.factor, 1e-9)
        burst = max(1, round(p.burst * self.factor))
        # A burst of B over a sustained rate R: at most B requests in any B/R seconds.
        window = max(1, math.ceil(burst / rate))
        allowed = burst
        (item,) = parse_many(f"{allowed}/{window} second")
        return item, f"tenant:{allowed}/{window}s (rate {rate:g}/s, burst {burst})"

    def check(self, tenant_id: str, user_id: str) -> RateLimitChecked:
        """Decide one request and, when allowed, count it against every limit."""
        checks: list[tuple[RateLimitItem, tuple[str, ...], str]] = []
        rate = self._rate_item()
        if rate is not None:
            checks.append((rate[0], ("rate", tenant_id), rate[1]))
        checks += [(i, ("tenant", tenant_id), f"tenant:{i}") for i in self._tenant]
        checks += [(i, ("user", tenant_id, user_id), f"user:{i}") for i in self._user]
        # Test every limit before counting any: a denied request consumes nothing.
        for item, ids, name in checks:
            if not self._strategy.test(item, *ids):
                reset = self._strategy.get_window_stats(item, *ids).reset_time
                return RateLimitChecked(
                    allowed=False,
                    limit=name,
                    retry_after_s=round(max(reset - self._clock(), 0.001), 3),
                    rate_factor=self.factor,
                    policy_version=self.policy.version,
                )
        for item, ids, _ in checks:
            self._strategy.hit(item, *ids)
        return RateLimitChecked(
            allowed=True, rate_factor=self.factor, policy_version=self.policy.version
        )

    def observe_upstream(
        self,
        outcome: str,
        latency_ms: float,
        deployment: str = "",
        deployments: Sequence[str] = (),
    ) -> RateAdjusted | None:
        """Adapt the rate to the upstream models: halve while every one of `deployments` is
        strained (a 429 or a slow reply within strained_window_s; without a list, any
        strain counts), recover gradually on healthy replies."""
        p = self.policy
        if not p.adaptive:
            return None
        if outcome == "rate_limited" or latency_ms > p.slow_ms:
            self._healthy = 0
            now = self._clock()
            self._strained[deployment] = now
            recent = {d for d, at in self._strained.items() if now - at < p.strained_window_s}
            if deployments and not set(deployments) <= recent:
                return None  # another deployment is still fine: the router fails over
            lowered = max(p.min_factor, round(self.factor / 2, 4))
            if lowered != self.factor:
                self.factor = lowered
                reason = "upstream rate-limited" if outcome == "rate_limited" else "upstream slow"
                return RateAdjusted(factor=lowered, reason=reason)
            return None
        if outcome == "ok" and self.factor < 1.0:
            self._healthy += 1
            if self._healthy >= p.recover_after:
                self._healthy = 0
                self.factor = min(1.0, round(self.factor + 0.1, 4))
                return RateAdjusted(factor=self.factor, reason="upstream healthy")
        return None

    def replay(self, event: Any, tenant_id: str, user_id: str) -> None:
        """Re-apply a recorded decision (the clock must read the event's time)."""
        match event:
            case RateLimitChecked(allowed=True):
                rate = self._rate_item()
                items = (
                    ([(rate[0], ("rate", tenant_id))] if rate else [])
                    + [(i, ("tenant", tenant_id)) for i in self._tenant]
                    + [(i, ("user", tenant_id, user_id)) for i in self._user]
                )
                for item, ids in items:
                    self._strategy.hit(item, *ids)
            case RateAdjusted(factor=factor):
                self.factor = factor
