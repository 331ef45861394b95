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


def test_a_state_that_went_through_json_judges_as_if_it_never_left() -> None:
    """The Faust tables keep each key's state as JSON (its changelog): a state written out
    and read back mid-stream must go on exactly as the one that stayed in memory."""
    import msgspec

    from streams.detectors import LatencyState, observations_of, observe_latency

    config = DetectorConfig(latency_min_ms=50, latency_warmup=20)
    stayed, travelled = LatencyState(), LatencyState()
    steady = [o for n in range(1, 40) for e in make_turn(n, latency_ms=20.0 + n % 5)
              for o in observations_of(e) if o.kind == "turn"]  # fmt: skip
    spike = next(
        o for e in make_turn(100, latency_ms=900.0) for o in observations_of(e) if o.kind == "turn"
    )
    for i, o in enumerate(steady):
        assert observe_latency(stayed, o, config) == []
        assert observe_latency(travelled, o, config) == []
        if i % 7 == 0:  # a restart: the state comes back from its JSON
            raw = msgspec.json.decode(msgspec.json.encode(msgspec.to_builtins(travelled)))
            travelled = msgspec.convert(raw, LatencyState)
    assert travelled == stayed
    found = observe_latency(travelled, spike, config)
    assert [f.detector for f in found] == ["latency_baseline"] and found[0].baseline < 30


def test_observations_are_keyed_by_each_detectors_key_in_event_time_order() -> None:
    from datetime import timedelta

    from events.observations import Observation, keyed

    at = BASE_TIME

    def turn(ms: int, model: str, tenant: str, failed: bool = False) -> Observation:
        return Observation(
            kind="turn",
            at=at + timedelta(milliseconds=ms),
            tenant_id=tenant,
            subject=model,
            failed=failed,
        )

    later, earlier = turn(5, "m1", "t1"), turn(1, "m1", "t2")
    failed = turn(3, "", "t1", failed=True)
    denied = Observation(kind="limit", at=at, tenant_id="t2", denied=True)
    sample = Observation(kind="memory", at=at, tenant_id="sys", subject="api", rss_mb=10)
    out = keyed([later, earlier, failed, denied, sample])
    assert out == {
        "model:m1": [earlier, later],  # a failed turn has no latency to judge
        "tenant:t1": [failed, later],
        "tenant:t2": [denied, earlier],
        "process:api": [sample],
    }


def test_a_finding_raised_again_is_the_same_event() -> None:
    from streams.detectors import Finding, finding_event

    f = Finding("t1", BASE_TIME, "latency_baseline", "latency_ms", 900.0, 300.0, subject="m1")
    first, again = finding_event(f), finding_event(f)
    assert first.event_id == again.event_id and first == again
    other = finding_event(Finding("t1", BASE_TIME, "latency_baseline", "latency_ms", 901.0, 300.0))
    assert other.event_id != first.event_id
