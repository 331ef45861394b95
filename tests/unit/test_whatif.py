"""Counterfactual replay over plain lists of recorded events (pure, deterministic)."""

from __future__ import annotations

from datetime import timedelta

from actors.limiter import LimitPolicy
from actors.router import Band, Deployment, RoutingPolicy, default_deployments
from actors.whatif import WhatIfPolicy, whatif
from tests.factories import BASE_TIME, make_turn

RECORDED = default_deployments()


def traffic(n: int = 20) -> list:  # type: ignore[type-arg]
    events: list = []  # type: ignore[type-arg]
    version = 1
    for i in range(1, n + 1):
        turn = make_turn(i, version=version, model="demo-1", at=BASE_TIME + timedelta(seconds=i))
        version += len(turn)
        events += turn
    return events


def permissive() -> LimitPolicy:
    return LimitPolicy(user="", tenant="", rate_per_s=0)


def test_the_same_policy_changes_nothing() -> None:
    policy = WhatIfPolicy(
        limits=permissive(),
        routing=RoutingPolicy(bands=(Band(name="all", max_complexity=1.0, model="demo-1"),)),
        deployments=RECORDED,
    )
    report = whatif(traffic(), policy, RECORDED)["t1"]
    assert report["recorded"] == report["whatif"]
    assert report["changed"] == {"newly_denied": 0, "newly_allowed": 0, "rerouted": 0}
    assert report["recorded"]["models"] == {"demo-1": 20}
    assert report["recorded"]["cost"] == 20 * 9 * 0.5 / 1000


def test_a_tighter_limit_denies_what_it_would_have_denied() -> None:
    tight = WhatIfPolicy(
        limits=LimitPolicy(user="5/hour", tenant="", rate_per_s=0),
        routing=RoutingPolicy(bands=(Band(name="all", max_complexity=1.0, model="demo-1"),)),
        deployments=RECORDED,
    )
    report = whatif(traffic(), tight, RECORDED)["t1"]
    assert report["whatif"]["denied"] == 15 and report["changed"]["newly_denied"] == 15
    assert report["whatif"]["models"] == {"demo-1": 5}


def test_a_cheaper_routing_table_moves_the_model_mix_and_the_cost() -> None:
    cheap = WhatIfPolicy(
        limits=permissive(),
        routing=RoutingPolicy(),  # simple queries (complexity 0.1) go to demo-fast
        deployments=[*RECORDED, Deployment(name="x", model="demo-x", price_per_1k_tokens=9)],
    )
    first = whatif(traffic(), cheap, RECORDED)
    report = first["t1"]
    assert report["whatif"]["models"] == {"demo-fast": 20}
    assert report["changed"]["rerouted"] == 20
    assert report["whatif"]["cost"] < report["recorded"]["cost"]
    assert whatif(traffic(), cheap, RECORDED) == first  # deterministic


def test_a_model_with_no_observed_latency_is_unknown_not_zero() -> None:
    """Requests rerouted to a model never seen answering in the window have no latency to
    estimate with: the mean says unknown (None) and they are counted apart, never as 0 ms."""
    cheap = WhatIfPolicy(
        limits=permissive(),
        routing=RoutingPolicy(),  # every request moves to demo-fast, never observed
        deployments=RECORDED,
    )
    report = whatif(traffic(), cheap, RECORDED)["t1"]
    assert report["recorded"]["latency_ms_mean"] > 0 and report["recorded"]["latency_unknown"] == 0
    assert report["whatif"]["latency_ms_mean"] is None
    assert report["whatif"]["latency_unknown"] == 20
    same = WhatIfPolicy(
        limits=permissive(),
        routing=RoutingPolicy(bands=(Band(name="all", max_complexity=1.0, model="demo-1"),)),
        deployments=RECORDED,
    )
    kept = whatif(traffic(), same, RECORDED)["t1"]["whatif"]
    assert kept["latency_ms_mean"] == report["recorded"]["latency_ms_mean"]
    assert kept["latency_unknown"] == 0
