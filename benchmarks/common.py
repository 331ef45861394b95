"""Shared helpers: timing, and the result rows the runner prints as a table."""

from __future__ import annotations

import os
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


def process_tree(root: int) -> list[int]:
    """`root` and every process below it (read from /proc, now)."""
    from pathlib import Path

    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.append(pid)
        todo += children.get(pid, [])
    return found


def cpu_seconds(pid: int | None) -> float:
    """CPU time (user + system) of one process, now; 0 if it is gone."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
