"""Shared helpers: timing, and the result rows the runner prints as a table."""

from __future__ import annotations

import asyncio
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
    target: float | None = None
    """The value this result should reach (at least, or at most for latencies); `make bench`
    exits non-zero when one is missed."""

    @property
    def meets_target(self) -> bool:
        if self.target is None or self.value != self.value:  # no target, or NaN: no verdict
            return self.target is None
        return self.value >= self.target if self.higher_is_better else self.value <= self.target

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


async def drive_turns(
    base: str, body: str, n: int, clients: int, *, own_connection: bool = False
) -> tuple[list[float], float]:
    """POST `n` whole chat turns (`body`) to `base` from `clients` concurrent clients: each
    turn's latency in seconds, and the rate in turns/s. The clients share one pool of
    `clients` connections, or with `own_connection` each opens its own.

    aiohttp, not httpx, on the client side: httpx's client costs more CPU per request than
    the server does, and on 2 cores the load generator must not be the bottleneck."""
    import aiohttp

    headers = {"content-type": "application/json"}
    samples: list[float] = []
    per_client = n // clients

    async def client(session: aiohttp.ClientSession) -> None:
        for _ in range(per_client):
            started = time.perf_counter()
            async with session.post("/v1/chat/completions", data=body, headers=headers) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"turn failed: {r.status}")
            samples.append(time.perf_counter() - started)

    async def on_own_connection() -> None:
        async with aiohttp.ClientSession(base) as session:
            await client(session)

    started = time.perf_counter()
    if own_connection:
        await asyncio.gather(*(on_own_connection() for _ in range(clients)))
    else:
        connector = aiohttp.TCPConnector(limit=clients)
        async with aiohttp.ClientSession(base, connector=connector) as session:
            await asyncio.gather(*(client(session) for _ in range(clients)))
    return samples, per_client * clients / (time.perf_counter() - started)
