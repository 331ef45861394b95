"""`make bench` prints each result next to its same-run baseline and exits non-zero when a
result misses its target, so a regression shows (issue 21)."""

from __future__ import annotations

import pytest

import benchmarks.__main__ as bench
from benchmarks.common import Result


def result(value: float, target: float | None, higher_is_better: bool = True) -> Result:
    return Result("r", "ms", value, "baseline", 1.0, higher_is_better, target=target)


def test_a_target_is_met_from_its_side() -> None:
    assert result(10, 5).meets_target and not result(4, 5).meets_target
    assert result(4, 5, higher_is_better=False).meets_target
    assert not result(6, 5, higher_is_better=False).meets_target
    assert result(1, None).meets_target and not result(float("nan"), 5).meets_target


@pytest.mark.parametrize(("value", "code"), [(300.0, 0), (120.0, 1)])
def test_make_bench_exits_non_zero_when_a_target_is_missed(
    monkeypatch: pytest.MonkeyPatch, value: float, code: int
) -> None:
    monkeypatch.setattr(bench, "SUITES", {"fake": lambda: [result(value, 200.0)]})
    assert bench.main(["fake"]) == code
