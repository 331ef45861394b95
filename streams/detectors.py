"""Streaming anomaly detectors (event time, pure: state in, state and findings out).

Each detector family keeps its state per key in a small struct, so that a host can keep it
anywhere: the Faust processors (infra/services/processors.py) keep it in tables backed by changelog
topics, keyed as the observations topic is (events/observations.py), so it survives a
restart and moves with its partition. `Detectors` keeps the same states in dictionaries
(for tests, what-if replays and single-process use).

- latency_baseline: a reply's latency against the exponentially weighted mean and
  deviation of its model's recent latencies (every tenant's replies of that model).
- slow_request: a reply slower than a fixed threshold.
- error_rate / denial_rate: per tenant and window, the share of failed replies /
  denied requests against a threshold and against the moving baseline of earlier
  windows.
- memory_growth: a process's resident memory against its moving baseline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec

from events import Envelope, RateLimitChecked, ReplyCompleted, ReplyFailed
from events.observations import Observation


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


LATENCY_FADING = 0.05
RATE_FADING = 0.3
MEMORY_FADING = 0.02


class Moving(msgspec.Struct, kw_only=True):
    """An exponentially weighted mean and variance (the first value starts both)."""

    count: int = 0
    mean: float = 0.0
    var: float = 0.0

    def update(self, x: float, fading: float) -> None:
        if self.count == 0:
            self.mean, self.var = x, 0.0
        else:
            diff = x - self.mean
            increment = fading * diff
            self.mean += increment
            self.var = (1 - fading) * (self.var + diff * increment)
        self.count += 1


class LatencyState(msgspec.Struct, kw_only=True):
    """Per model: its latency baseline and when it last raised a finding."""

    baseline: Moving = msgspec.field(default_factory=Moving)
    alerted_at: float | None = None


class Window(msgspec.Struct, kw_only=True):
    start: float
    total: int = 0
    hits: int = 0


class RateState(msgspec.Struct, kw_only=True):
    """Per tenant and rate (error_rate, denial_rate): the open window, the baseline of the
    closed ones, when it last raised a finding."""

    window: Window | None = None
    baseline: Moving = msgspec.field(default_factory=Moving)
    alerted_at: float | None = None


class TenantRates(msgspec.Struct, kw_only=True):
    error_rate: RateState = msgspec.field(default_factory=RateState)
    denial_rate: RateState = msgspec.field(default_factory=RateState)


class MemoryState(msgspec.Struct, kw_only=True):
    baseline: Moving = msgspec.field(default_factory=Moving)
    alerted_at: float | None = None


def _cooled(alerted_at: float | None, now: float, config: DetectorConfig) -> bool:
    return alerted_at is None or now - alerted_at >= config.cooldown_s


def observe_latency(state: LatencyState, o: Observation, config: DetectorConfig) -> list[Finding]:
    """A finished turn of the state's model (updates `state`)."""
    c, found = config, []
    if o.latency_ms > c.slow_request_ms:
        found.append(
            Finding(
                o.tenant_id,
                o.at,
                "slow_request",
                "latency_ms",
                o.latency_ms,
                c.slow_request_ms,
                subject=o.context_id,
                detail=f"model {o.subject}",
            )
        )
    base = state.baseline
    if base.count >= c.latency_warmup:
        mean, sd = base.mean, math.sqrt(max(base.var, 0.0))
        threshold = max(mean + c.latency_sigmas * sd, c.latency_min_ms)
        now = o.at.timestamp()
        if o.latency_ms > threshold and _cooled(state.alerted_at, now, c):
            state.alerted_at = now
            found.append(
                Finding(
                    o.tenant_id,
                    o.at,
                    "latency_baseline",
                    "latency_ms",
                    o.latency_ms,
                    round(threshold, 3),
                    baseline=round(mean, 3),
                    subject=o.subject,
                    detail=f"{c.latency_sigmas} sigmas over the moving mean",
                )
            )
    base.update(o.latency_ms, LATENCY_FADING)
    return found


def observe_rates(state: TenantRates, o: Observation, config: DetectorConfig) -> list[Finding]:
    """A finished turn (error rate) or a limiter decision (denial rate) of the state's
    tenant (updates `state`)."""
    if o.kind == "turn":
        return _rate(state.error_rate, o, "error_rate", o.failed, config)
    if o.kind == "limit":
        return _rate(state.denial_rate, o, "denial_rate", o.denied, config)
    return []


def _rate(
    state: RateState, o: Observation, metric: str, hit: bool, config: DetectorConfig
) -> list[Finding]:
    now = o.at.timestamp()
    start = now - now % config.window_s
    window = state.window
    found: list[Finding] = []
    if window is None or start > window.start:
        if window is not None:
            found += _close(state, window, o.tenant_id, metric, o.at, config)
        window = state.window = Window(start=start)
    elif start < window.start:
        return found  # a late event of a closed window: counted nowhere (documented)
    window.total += 1
    window.hits += int(hit)
    return found


def _close(
    state: RateState,
    window: Window,
    tenant: str,
    metric: str,
    at: datetime,
    config: DetectorConfig,
) -> list[Finding]:
    c = config
    if window.total < c.min_requests:
        return []
    rate = window.hits / window.total
    baseline = state.baseline
    before = baseline.mean if baseline.count else 0.0
    baseline.update(rate, RATE_FADING)
    limit = c.error_rate_max if metric == "error_rate" else c.denial_rate_max
    threshold = max(limit, before * c.rate_factor)
    now = at.timestamp()
    if rate > threshold and _cooled(state.alerted_at, now, c):
        state.alerted_at = now
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


def observe_memory(state: MemoryState, o: Observation, config: DetectorConfig) -> list[Finding]:
    """A resident-memory sample of the state's process (updates `state`)."""
    c = config
    baseline = state.baseline
    if baseline.count == 0:
        baseline.update(o.rss_mb, MEMORY_FADING)
        return []
    mean = baseline.mean
    baseline.update(o.rss_mb, MEMORY_FADING)
    threshold = max(mean + c.memory_growth_mb, mean * (1 + c.memory_growth_ratio))
    now = o.at.timestamp()
    if o.rss_mb > threshold and _cooled(state.alerted_at, now, c):
        state.alerted_at = now
        return [
            Finding(
                o.tenant_id,
                o.at,
                "memory_growth",
                "rss_mb",
                round(o.rss_mb, 1),
                round(threshold, 1),
                baseline=round(mean, 1),
                subject=o.subject,
            )
        ]
    return []


def observations_of(event: Envelope[Any]) -> list[Observation]:
    """What the detectors need of an event of the log (most events: nothing)."""
    p = event.payload
    if not isinstance(p, ReplyCompleted | ReplyFailed | RateLimitChecked):
        return []
    turn = Observation(
        kind="turn", at=event.occurred_at, tenant_id=event.tenant_id, context_id=event.stream_id
    )
    if isinstance(p, ReplyCompleted):
        return [msgspec.structs.replace(turn, subject=p.model, latency_ms=max(p.latency_ms, 0.0))]
    if isinstance(p, ReplyFailed):
        return [msgspec.structs.replace(turn, failed=True)]
    return [msgspec.structs.replace(turn, kind="limit", denied=not p.allowed)]


def memory_observation(tenant_id: str, process: str, rss_mb: float, at: datetime) -> Observation:
    return Observation(
        kind="memory", at=at, tenant_id=tenant_id, subject=process, rss_mb=max(rss_mb, 0.0)
    )


class Detectors:
    """Every detector with its states in dictionaries, in one process."""

    def __init__(self, config: DetectorConfig | None = None) -> None:
        self.config = config or DetectorConfig()
        self.latency: dict[str, LatencyState] = {}
        self.rates: dict[str, TenantRates] = {}
        self.memory: dict[str, MemoryState] = {}

    def observe(self, event: Envelope[Any]) -> list[Finding]:
        return [f for o in observations_of(event) for f in self.judge(o)]

    def judge(self, o: Observation) -> list[Finding]:
        c, found = self.config, []
        if o.kind == "turn" and not o.failed:
            found += observe_latency(self.latency.setdefault(o.subject, LatencyState()), o, c)
        if o.kind in ("turn", "limit"):
            found += observe_rates(self.rates.setdefault(o.tenant_id, TenantRates()), o, c)
        if o.kind == "memory":
            found += observe_memory(self.memory.setdefault(o.subject, MemoryState()), o, c)
        return found

    def observe_memory(
        self, tenant_id: str, process: str, rss_mb: float, at: datetime
    ) -> list[Finding]:
        """A process's resident memory sample; a finding when it grew past its baseline."""
        return self.judge(memory_observation(tenant_id, process, rss_mb, at))


FINDINGS_WRITER = "anomaly-detectors"
"""The user_id of the AnomalyDetected events the detectors append."""


def finding_event_id(f: Finding) -> str:
    """A UUIDv7 made of the finding itself (its time, and a digest of what it says): a
    finding raised again after a redelivery is the same event, kept once by the archive."""
    import hashlib

    millis = int(f.at.timestamp() * 1000) & ((1 << 48) - 1)
    identity = "|".join(
        [f.detector, f.tenant_id, f.subject, f.metric, repr(f.observed), f.at.isoformat()]
    )
    bits = int.from_bytes(hashlib.sha256(identity.encode()).digest()[:10], "big")
    rand_a, rand_b = bits >> 68 & 0xFFF, bits & ((1 << 62) - 1)
    value = millis << 80 | 0x7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def finding_event(f: Finding) -> Envelope[Any]:
    """The finding as the AnomalyDetected event of a stream of its own (`anomaly:<id>`)."""
    from events import AnomalyDetected
    from events.standalone import standalone

    payload = AnomalyDetected(
        detector=f.detector,
        metric=f.metric,
        observed=f.observed,
        threshold=f.threshold,
        baseline=f.baseline,
        window_s=f.window_s,
        subject=f.subject,
        detail=f.detail,
    )
    return standalone(
        payload,
        event_id=finding_event_id(f),
        tenant_id=f.tenant_id,
        user_id=FINDINGS_WRITER,
        occurred_at=f.at,
        stream="anomaly",
    )
