"""Shared helpers: timing, and the result rows the runner prints as a table."""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Result:
    name: str
    unit: str
    value: float
    baseline_name: str
    baseline: float
    higher_is_better: bool = True
    note: str = ""

    @property
    def ratio(self) -> float:
        """Measured / baseline (latencies: baseline / measured); 1.0 = as fast as the baseline."""
        if self.higher_is_better:
            return self.value / self.baseline if self.baseline else float("nan")
        return self.baseline / self.value if self.value else float("nan")


def best_rate(fn: Callable[[], int], repeats: int = 3) -> float:
    """Items per second of the best of `repeats` runs of `fn` (which returns the item count)."""
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        count = fn()
        rates.append(count / (time.perf_counter() - started))
    return max(rates)


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


async def read_body(receive: Callable[[], Awaitable[dict[str, Any]]]) -> bytes:
    """A raw ASGI request's whole body (the benchmarks' small apps)."""
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    return body
