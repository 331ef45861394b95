"""Prometheus metrics of one process (its own registry: no global state, no clash between
two stacks in one process)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300)


class Metrics:
    """What a process exports at /metrics: the API process its turns, the process that runs
    the projections their lag (the API's /metrics shows both)."""

    def __init__(self, *, turns: bool = True, projections: bool = True) -> None:
        self.registry = CollectorRegistry()
        # Families a process does not own are not registered at all: two expositions
        # shown together must not both describe one family.
        registry = self.registry if turns else CollectorRegistry()
        self.turns = Counter(
            "chatllm_turns",
            "Chat turns by outcome and model.",
            ["status", "model"],
            registry=registry,
        )
        self.turn_seconds = Histogram(
            "chatllm_turn_seconds",
            "Chat turn latency seen by the API (until the log acked).",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        registry = self.registry if projections else CollectorRegistry()
        self.projection_lag = Histogram(
            "chatllm_projection_lag_seconds",
            "From an event's occurred_at to its row being written, per processor.",
            ["processor"],
            buckets=LAG_BUCKETS,
            registry=registry,
        )

        self._lag_of: dict[str, Any] = {}
        self.recent_lag: deque[tuple[float, tuple[str, ...], list[float]]] = deque(maxlen=5_000)
        """Per written batch: when, its processors, the lags of its events (one entry per
        batch, not per event and processor: 60 s of batches fit at any rate)."""

    def gauge(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """A gauge whose value is read at scrape time."""
        Gauge(name, documentation, registry=self.registry).set_function(read)

    def processes(self, probe: Callable[[], dict[str, float]]) -> None:
        """`chatllm_process_resident_mib{process}`: each process's memory, read at scrape."""

        class Resident:
            def collect(self) -> Any:
                family = GaugeMetricFamily(
                    "chatllm_process_resident_mib",
                    "Resident memory of each process of the stack (MiB).",
                    labels=["process"],
                )
                for process, mib in sorted(probe().items()):
                    family.add_metric([process], mib)
                yield family

        self.registry.register(Resident())

    def observe_lags(self, processors: tuple[str, ...], lags: list[float]) -> None:
        """The lags of one written batch, the same for each of its processors."""
        for processor in processors:
            child = self._lag_of.get(processor)
            if child is None:
                child = self._lag_of[processor] = self.projection_lag.labels(processor=processor)
            for seconds in lags:
                child.observe(seconds)
        self.recent_lag.append((time.time(), processors, lags))

    def lag_summary(self, window_s: float = 60.0) -> dict[str, dict[str, float]]:
        """Per processor, p50/p99/max of the lags observed in the last `window_s` (live view)."""
        since = time.time() - window_s
        by: dict[str, list[float]] = {}
        for at, processors, lags in list(self.recent_lag):
            if at >= since:
                for processor in processors:
                    by.setdefault(processor, []).extend(lags)
        out = {}
        for processor, values in sorted(by.items()):
            values.sort()
            out[processor] = {
                "p50_s": values[len(values) // 2],
                "p99_s": values[min(len(values) - 1, int(len(values) * 0.99))],
                "max_s": values[-1],
                "samples": float(len(values)),
            }
        return out

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
