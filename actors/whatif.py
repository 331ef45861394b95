"""Counterfactual replay: the recorded requests' decisions re-run under another policy,
without calling any model (pure and deterministic: the same events and policy give the
same report).

For each recorded request (a turn: its RateLimitChecked, RouteDecided, ModelCalled and
reply events), in time order:

- the rate limit is decided again by a limiter with the new policy, on a clock that reads
  the request's recorded time (the upstream behaviour it saw, the ModelCalled outcomes, feeds
  the adaptive factor as it did then);
- the route is decided again from its recorded inputs (complexity and band, sticky model,
  the model asked for) with the new routing table;
- a request that keeps its model keeps its recorded outcome; one that moves to another model
  is estimated: it succeeds, with that model's mean observed latency in the window and the
  same tokens. Cost is tokens times the model's price (`price_per_1k_tokens` of its first
  deployment). A request that was denied before and is allowed now has no recorded route:
  it is counted under `unrouted`.
- with learned routing (routing.learning), a band with candidates is chosen again by a
  bandit that learns from the recorded feedback as it came in, seeded as the live one is:
  the policy in force replays the live choices, another shows what it would have chosen.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from actors.bandit import QualityBandit
from actors.limiter import LimitPolicy, RateLimiter
from actors.router import Deployment, RoutingPolicy
from events import (
    Envelope,
    FeedbackGiven,
    ModelCalled,
    RateLimitChecked,
    ReplyCompleted,
    ReplyFailed,
    RouteDecided,
)


class WhatIfPolicy(msgspec.Struct, frozen=True, kw_only=True):
    limits: LimitPolicy = msgspec.field(default_factory=LimitPolicy)
    routing: RoutingPolicy = msgspec.field(default_factory=RoutingPolicy)
    deployments: list[Deployment] = msgspec.field(default_factory=list)
    """Empty: the deployments in force now."""

    def problems(self) -> list[str]:
        """What makes this policy unusable (a routing table naming unknown models)."""
        known = {d.model for d in self.deployments}
        missing = sorted({b.model for b in self.routing.bands} - known)
        return [f"routing.bands name models without deployments: {missing}"] if missing else []


@dataclass
class _Turn:
    tenant_id: str
    user_id: str
    context_id: str
    at: float
    order: str
    limit: RateLimitChecked | None = None
    route: RouteDecided | None = None
    calls: list[ModelCalled] = field(default_factory=list)
    reply: ReplyCompleted | ReplyFailed | None = None


@dataclass
class Side:
    """One column of the report: what happened, or what would have."""

    requests: int = 0
    denied: int = 0
    failed: int = 0
    fallbacks: int = 0
    unrouted: int = 0
    models: Counter[str] = field(default_factory=Counter)
    cost: float = 0.0
    latency_ms_total: float = 0.0
    answered: int = 0
    latency_known: int = 0
    """Answers whose latency is known (observed, or the answering model's observed mean)."""
    latency_unknown: int = 0
    """Answers rerouted to a model with no observed latency in the window: counted apart,
    never as 0 ms."""

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "denied": self.denied,
            "failed": self.failed,
            "fallbacks": self.fallbacks,
            "unrouted": self.unrouted,
            "models": dict(sorted(self.models.items())),
            "cost": round(self.cost, 6),
            "latency_ms_mean": round(self.latency_ms_total / self.latency_known, 3)
            if self.latency_known
            else None,
            "latency_unknown": self.latency_unknown,
        }


class _Clock:
    def __init__(self) -> None:
        self.at = 0.0

    def __call__(self) -> float:
        return self.at


_TURN_TYPES = (RateLimitChecked, RouteDecided, ModelCalled, ReplyCompleted, ReplyFailed)
_CHANGES = ("newly_denied", "newly_allowed", "rerouted")
WHATIF_TYPES = (*(t.__name__ for t in _TURN_TYPES), "FeedbackGiven")
"""The event types a what-if reads."""


def _turns(events: Iterable[Envelope[Any]]) -> list[_Turn]:
    turns: dict[str, _Turn] = {}
    for event in sorted(events, key=lambda e: (e.occurred_at, e.event_id)):
        p = event.payload
        if not isinstance(p, _TURN_TYPES):
            continue
        turn = turns.get(event.correlation_id)
        if turn is None:
            turn = turns[event.correlation_id] = _Turn(
                event.tenant_id,
                event.user_id,
                event.stream_id,
                event.occurred_at.timestamp(),
                f"{event.occurred_at.isoformat()}{event.event_id}",
            )
        if isinstance(p, RateLimitChecked):
            turn.limit = p
            turn.at = event.occurred_at.timestamp()
        elif isinstance(p, RouteDecided) and turn.route is None:
            turn.route = p
        elif isinstance(p, ModelCalled):
            turn.calls.append(p)
        elif isinstance(p, ReplyCompleted | ReplyFailed) and turn.reply is None:
            turn.reply = p
    return sorted((t for t in turns.values() if t.limit is not None), key=lambda t: t.order)


def _prices(deployments: Sequence[Deployment]) -> dict[str, float]:
    prices: dict[str, float] = {}
    for d in deployments:
        prices.setdefault(d.model, d.price_per_1k_tokens)
    return prices


def _tokens(turn: _Turn) -> int:
    if isinstance(turn.reply, ReplyCompleted):
        return turn.reply.prompt_tokens + turn.reply.completion_tokens
    return 0


def whatif(
    events: Iterable[Envelope[Any]],
    policy: WhatIfPolicy,
    recorded_deployments: Sequence[Deployment],
) -> dict[str, dict[str, Any]]:
    """Per tenant: {"recorded": ..., "whatif": ..., "changed": ...} (see the module doc)."""
    events = list(events)
    turns = _turns(events)
    latency: dict[str, list[float]] = {}
    for turn in turns:
        for call in turn.calls:
            if call.outcome == "ok":
                latency.setdefault(call.model, []).append(call.latency_ms)
    mean_latency = {m: sum(v) / len(v) for m, v in latency.items()}
    old_prices = _prices(recorded_deployments)
    new_prices = _prices(policy.deployments)
    new_models = {d.model for d in policy.deployments}
    clock = _Clock()
    limiter = RateLimiter(policy.limits, clock)
    # Learned routing learns again, from the feedback as it came in (before each request,
    # what had been given by then).
    bandit = QualityBandit(policy.routing.learning)
    feedback = sorted(
        (e for e in events if isinstance(e.payload, FeedbackGiven)),
        key=lambda e: (e.occurred_at, e.event_id),
    )
    given = 0
    sticky: dict[str, str] = {}
    report: dict[str, dict[str, Any]] = {}
    sides: dict[str, tuple[Side, Side, Counter[str]]] = {}
    for turn in turns:
        recorded, counter, changed = sides.setdefault(turn.tenant_id, (Side(), Side(), Counter()))
        recorded.requests += 1
        counter.requests += 1
        assert turn.limit is not None
        # What happened.
        if not turn.limit.allowed:
            recorded.denied += 1
        elif turn.route is not None:
            model = turn.reply.model if turn.reply and turn.reply.model else turn.route.model
            if isinstance(turn.reply, ReplyFailed):
                recorded.failed += 1
            elif isinstance(turn.reply, ReplyCompleted):
                recorded.models[model] += 1
                recorded.fallbacks += int(turn.reply.fallback)
                recorded.cost += _tokens(turn) * old_prices.get(model, 0.0) / 1000
                recorded.latency_ms_total += turn.reply.latency_ms
                recorded.latency_known += 1
                recorded.answered += 1
        # What would have.
        while given < len(feedback) and feedback[given].occurred_at.timestamp() <= turn.at:
            bandit.learn(feedback[given].tenant_id, feedback[given].payload)
            given += 1
        clock.at = turn.at
        decision = limiter.check(turn.tenant_id, turn.user_id)
        for call in turn.calls:  # the upstream behaved as it did
            limiter.observe_upstream(call.outcome, call.latency_ms)
        if not decision.allowed:
            counter.denied += 1
            changed["newly_denied"] += int(turn.limit.allowed)
            continue
        changed["newly_allowed"] += int(not turn.limit.allowed)
        if turn.route is None:
            counter.unrouted += 1
            continue
        route = turn.route
        band = next(
            (b for b in policy.routing.bands if route.complexity <= b.max_complexity),
            policy.routing.bands[-1],
        )
        model = band.model
        candidates = [m for m in band.candidates if m in new_models]
        if route.reason == "requested" and route.model in new_models:
            model = route.model
        elif policy.routing.sticky and sticky.get(turn.context_id) in new_models:
            model = sticky[turn.context_id]
        elif policy.routing.learning.enabled and candidates:
            model, _, _ = bandit.choose(turn.tenant_id, band.name, candidates, route.in_reply_to)
        recorded_model = route.model
        if model == recorded_model:
            if isinstance(turn.reply, ReplyFailed):
                counter.failed += 1
                continue
            if isinstance(turn.reply, ReplyCompleted):
                answered_by = turn.reply.model
                counter.fallbacks += int(turn.reply.fallback)
                counter.latency_ms_total += turn.reply.latency_ms
                counter.latency_known += 1
            else:
                answered_by = model
        else:
            answered_by = model
            changed["rerouted"] += 1
            if model in mean_latency:
                counter.latency_ms_total += mean_latency[model]
                counter.latency_known += 1
            else:
                counter.latency_unknown += 1
        counter.models[answered_by] += 1
        counter.cost += _tokens(turn) * new_prices.get(answered_by, 0.0) / 1000
        counter.answered += 1
        sticky[turn.context_id] = answered_by
    for tenant, (recorded, counter, changed) in sorted(sides.items()):
        report[tenant] = {
            "recorded": recorded.summary(),
            "whatif": counter.summary(),
            "changed": {k: changed.get(k, 0) for k in _CHANGES},
        }
    return report
