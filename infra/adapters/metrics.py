"""Prometheus metrics of one process (its own registry: no global state, no clash between
two stacks in one process)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300)


class Metrics:
    """What a process exports at /metrics: the API process its turns, the process that runs
    the projections their lag (the API's /metrics shows both)."""

    def __init__(self, *, turns: bool = True, projections: bool = True) -> None:
        self.registry = CollectorRegistry()
        # Families a process does not own are not registered at all: two expositions
        # shown together must not both describe one family. The turns' own registry: with
        # several API processes, /metrics shows them summed over all (see `shared`).
        self._turns = CollectorRegistry()
        self._owns_turns = turns
        self.peers: Path | None = None
        self.index = 0
        registry = self._turns if turns else CollectorRegistry()
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

    def shared(self, directory: Path, index: int) -> None:
        """This is API process `index` of several that share `directory`: each writes its
        turn counters there (`publish`), and /metrics, whichever process answers it, shows
        their sum (a scrape lands on one process of the port, and must see them all)."""
        directory.mkdir(parents=True, exist_ok=True)
        self.peers, self.index = directory, index

    def turn_samples(self) -> list[tuple[str, str, dict[str, str], float]]:
        """(family, sample name, labels, value) of this process's turn counters."""
        return [
            (family.name, sample.name, dict(sample.labels), sample.value)
            for family in self._turns.collect()
            for sample in family.samples
        ]

    def publish(self) -> None:
        """Write this process's turn counters for the others (atomically: write, rename)."""
        if self.peers is None or not self._owns_turns:
            return
        path = self.peers / f"api-{self.index}.json"
        partial = path.with_suffix(".partial")
        partial.write_bytes(msgspec.json.encode(self.turn_samples()))
        partial.replace(path)

    def _peer_samples(self) -> Iterator[list[tuple[str, str, dict[str, str], float]]]:
        if self.peers is None:
            return
        for path in sorted(self.peers.glob("api-*.json")):
            if path.name == f"api-{self.index}.json":
                continue  # our own counters are read live
            try:
                yield msgspec.json.decode(
                    path.read_bytes(), type=list[tuple[str, str, dict[str, str], float]]
                )
            except (OSError, msgspec.DecodeError):
                continue  # a peer that is starting or gone: its last file or nothing

    def exposition(self) -> bytes:
        text = generate_latest(self.registry)
        if not self._owns_turns:
            return text
        if self.peers is None:
            return text + generate_latest(self._turns)
        summed = CollectorRegistry()
        summed.register(_Summed(self._turns, [self.turn_samples(), *self._peer_samples()]))
        return text + generate_latest(summed)


class _Summed:
    """The turn families with each sample summed over the API processes (a `_created`
    timestamp is the earliest, not a sum)."""

    def __init__(
        self,
        own: CollectorRegistry,
        processes: Iterable[list[tuple[str, str, dict[str, str], float]]],
    ) -> None:
        self._families = {f.name: (f.documentation, f.type) for f in own.collect()}
        self._processes = list(processes)

    def collect(self) -> Iterator[Metric]:
        totals: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = {}
        for samples in self._processes:
            for family, name, labels, value in samples:
                key = (family, name, tuple(sorted(labels.items())))
                if key not in totals:
                    totals[key] = value
                elif name.endswith("_created"):
                    totals[key] = min(totals[key], value)
                else:
                    totals[key] += value
        for family, (documentation, kind) in self._families.items():
            metric = Metric(family, documentation, kind)
            for (of, name, pairs), value in totals.items():
                if of == family:
                    metric.add_sample(name, dict(pairs), value)
            yield metric
