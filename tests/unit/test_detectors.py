"""Anomaly detectors over plain lists of events (event time, no I/O)."""

from __future__ import annotations

from datetime import timedelta

from streams.detectors import DetectorConfig, Detectors
from tests.factories import BASE_TIME, make_turn


def _run(detectors: Detectors, turns: list[list]) -> list:  # type: ignore[type-arg]
    return [f for turn in turns for e in turn for f in detectors.observe(e)]


def test_latency_against_the_moving_baseline() -> None:
    d = Detectors(DetectorConfig(latency_min_ms=50, latency_warmup=20))
    steady = [make_turn(n, latency_ms=20.0 + n % 5) for n in range(1, 60)]
    assert _run(d, steady) == []
    spike = _run(d, [make_turn(100, latency_ms=900.0)])
    assert [f.detector for f in spike] == ["latency_baseline"]
    assert spike[0].observed == 900.0 and spike[0].threshold < 900 and spike[0].baseline < 30
    # Cooldown: a second spike right after is not reported again.
    assert _run(d, [make_turn(101, latency_ms=950.0)]) == []


def test_slow_requests_over_the_fixed_threshold() -> None:
    d = Detectors(DetectorConfig(slow_request_ms=500))
    found = _run(d, [make_turn(1, latency_ms=800.0)])
    assert [f.detector for f in found] == ["slow_request"] and found[0].subject == "ctx-1"


def test_error_rate_spike_is_reported_when_its_window_closes() -> None:
    d = Detectors(DetectorConfig(window_s=60, min_requests=10, error_rate_max=0.2))

    def window(start_s: int, failures: int, total: int = 20) -> list[list]:  # type: ignore[type-arg]
        at = BASE_TIME + timedelta(seconds=start_s)
        return [
            make_turn(
                start_s * 100 + i,
                outcome="failed" if i < failures else "ok",
                at=at + timedelta(milliseconds=i),
            )
            for i in range(total)
        ]

    assert _run(d, window(0, 1) + window(60, 1)) == []
    found = _run(d, window(120, 12) + window(180, 0))
    assert [f.detector for f in found] == ["error_rate"]
    assert found[0].observed == 0.6 and found[0].threshold == 0.2 and found[0].window_s == 60


def test_denial_rate_spike() -> None:
    d = Detectors(DetectorConfig(window_s=60, min_requests=10, denial_rate_max=0.5))
    at = BASE_TIME
    turns = [
        make_turn(i, outcome="denied" if i % 4 else "ok", at=at + timedelta(milliseconds=i))
        for i in range(1, 41)
    ]
    turns.append(make_turn(999, at=at + timedelta(seconds=61)))
    found = _run(d, turns)
    assert [f.detector for f in found] == ["denial_rate"] and found[0].observed == 0.75


def test_memory_growth_of_a_process() -> None:
    d = Detectors(DetectorConfig(memory_growth_mb=100, memory_growth_ratio=0.5, cooldown_s=0))
    samples = [200.0] * 10
    found = [
        f
        for i, rss in enumerate([*samples, 420.0])
        for f in d.observe_memory("t1", "api", rss, BASE_TIME + timedelta(seconds=i))
    ]
    assert [(f.detector, f.subject, f.observed) for f in found] == [("memory_growth", "api", 420.0)]
