"""Streaming anomaly detectors over the log (river statistics, event time).

Each detector sees events one at a time and returns findings; the projection worker
appends each finding to the log as an AnomalyDetected event, and the projector
turns those into rows of the `anomalies` table. Detectors keep their state in
memory: after a restart the baselines warm up again (they are moving baselines,
so they forget the past anyway).

- latency_baseline: a reply's latency against the exponentially weighted mean and
  deviation of its model's recent latencies (river EWMean / EWVar).
- slow_request: a reply slower than a fixed threshold.
- error_rate / denial_rate: per tenant and window, the share of failed replies /
  denied requests against a threshold and against the moving baseline of earlier
  windows.
- memory_growth: a process's resident memory against its moving baseline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from river import stats

from events import Envelope, RateLimitChecked, ReplyCompleted, ReplyFailed


@dataclass(frozen=True)
class DetectorConfig:
    latency_sigmas: float = 4.0
    """A reply is anomalous beyond mean + this many standard deviations."""
    latency_min_ms: float = 250.0
    """... and only if it is also slower than this (no findings about microseconds)."""
    latency_warmup: int = 30
    """Replies of a model before its baseline is trusted."""
    slow_request_ms: float = 10_000.0
    window_s: float = 60.0
    """Rate windows (tumbling, by event time)."""
    min_requests: int = 20
    """A window with fewer requests says nothing about rates."""
    error_rate_max: float = 0.2
    denial_rate_max: float = 0.5
    rate_factor: float = 3.0
    """A rate must also be this many times its baseline (when there is one)."""
    memory_growth_mb: float = 256.0
    memory_growth_ratio: float = 0.5
    cooldown_s: float = 60.0
    """At most one finding per detector and subject within this time."""


@dataclass(frozen=True)
class Finding:
    tenant_id: str
    at: datetime
    detector: str
    metric: str
    observed: float
    threshold: float
    baseline: float = 0.0
    window_s: float = 0.0
    subject: str = ""
    detail: str = ""


_FADING = 0.05


@dataclass
class _Baseline:
    mean: Any = field(default=None)
    var: Any = field(default=None)
    count: int = 0

    def __post_init__(self) -> None:
        if self.mean is None:
            self.mean = stats.EWMean(fading_factor=_FADING)
        if self.var is None:
            self.var = stats.EWVar(fading_factor=_FADING)


@dataclass
class _Window:
    start: float
    total: int = 0
    hits: int = 0


class Detectors:
    def __init__(self, config: DetectorConfig | None = None) -> None:
        self.config = config or DetectorConfig()
        self._latency: dict[tuple[str, str], _Baseline] = {}
        self._rates: dict[tuple[str, str], _Window] = {}
        self._rate_baselines: dict[tuple[str, str], _Baseline] = {}
        self._memory: dict[str, Any] = {}
        self._last: dict[tuple[str, str, str], float] = {}

    def _cooled(self, key: tuple[str, str, str], at: datetime) -> bool:
        now = at.timestamp()
        last = self._last.get(key)
        if last is not None and now - last < self.config.cooldown_s:
            return False
        self._last[key] = now
        return True

    def observe(self, event: Envelope[Any]) -> list[Finding]:
        found: list[Finding] = []
        p = event.payload
        if isinstance(p, ReplyCompleted):
            found += self._latency_of(event, p)
            found += self._rate(event, "error_rate", hit=False)
        elif isinstance(p, ReplyFailed):
            found += self._rate(event, "error_rate", hit=True)
        elif isinstance(p, RateLimitChecked):
            found += self._rate(event, "denial_rate", hit=not p.allowed)
        return found

    def _latency_of(self, event: Envelope[Any], p: ReplyCompleted) -> list[Finding]:
        c = self.config
        found: list[Finding] = []
        if p.latency_ms > c.slow_request_ms:
            found.append(
                Finding(
                    event.tenant_id,
                    event.occurred_at,
                    "slow_request",
                    "latency_ms",
                    p.latency_ms,
                    c.slow_request_ms,
                    subject=event.stream_id,
                    detail=f"model {p.model}",
                )
            )
        key = (event.tenant_id, p.model)
        base = self._latency.setdefault(key, _Baseline())
        if base.count >= c.latency_warmup:
            mean, sd = base.mean.get(), math.sqrt(max(base.var.get(), 0.0))
            threshold = max(mean + c.latency_sigmas * sd, c.latency_min_ms)
            if p.latency_ms > threshold and self._cooled(
                ("latency_baseline", *key), event.occurred_at
            ):
                found.append(
                    Finding(
                        event.tenant_id,
                        event.occurred_at,
                        "latency_baseline",
                        "latency_ms",
                        p.latency_ms,
                        round(threshold, 3),
                        baseline=round(mean, 3),
                        subject=p.model,
                        detail=f"{c.latency_sigmas} sigmas over the moving mean",
                    )
                )
        base.mean.update(p.latency_ms)
        base.var.update(p.latency_ms)
        base.count += 1
        return found

    def _rate(self, event: Envelope[Any], metric: str, *, hit: bool) -> list[Finding]:
        c = self.config
        key = (event.tenant_id, metric)
        now = event.occurred_at.timestamp()
        start = now - now % c.window_s
        window = self._rates.get(key)
        found: list[Finding] = []
        if window is None or start > window.start:
            if window is not None:
                found += self._close(key, window, event.occurred_at)
            window = self._rates[key] = _Window(start)
        elif start < window.start:
            return found  # a late event of a closed window: counted nowhere (documented)
        window.total += 1
        window.hits += int(hit)
        return found

    def _close(self, key: tuple[str, str], window: _Window, at: datetime) -> list[Finding]:
        c = self.config
        tenant, metric = key
        if window.total < c.min_requests:
            return []
        rate = window.hits / window.total
        baseline = self._rate_baselines.setdefault(
            key, _Baseline(mean=stats.EWMean(fading_factor=0.3))
        )
        before = baseline.mean.get() if baseline.count else 0.0
        baseline.mean.update(rate)
        baseline.count += 1
        limit = c.error_rate_max if metric == "error_rate" else c.denial_rate_max
        threshold = max(limit, before * c.rate_factor)
        if rate > threshold and self._cooled(("rate", tenant, metric), at):
            return [
                Finding(
                    tenant,
                    at,
                    metric,
                    metric,
                    round(rate, 4),
                    round(threshold, 4),
                    baseline=round(before, 4),
                    window_s=c.window_s,
                    detail=f"{window.hits} of {window.total} requests",
                )
            ]
        return []

    def observe_memory(
        self, tenant_id: str, process: str, rss_mb: float, at: datetime
    ) -> list[Finding]:
        """A process's resident memory sample; a finding when it grew past its baseline."""
        c = self.config
        baseline = self._memory.get(process)
        if baseline is None:
            baseline = self._memory[process] = stats.EWMean(fading_factor=0.02)
            baseline.update(rss_mb)
            return []
        mean = baseline.get()
        baseline.update(rss_mb)
        threshold = max(mean + c.memory_growth_mb, mean * (1 + c.memory_growth_ratio))
        if rss_mb > threshold and self._cooled(("memory_growth", tenant_id, process), at):
            return [
                Finding(
                    tenant_id,
                    at,
                    "memory_growth",
                    "rss_mb",
                    round(rss_mb, 1),
                    round(threshold, 1),
                    baseline=round(mean, 1),
                    subject=process,
                )
            ]
        return []
