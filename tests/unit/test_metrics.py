"""The projection lag metrics: one observation per event and processor, and a live summary
that covers its whole window at any rate."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from infra.adapters.metrics import Metrics


def _count(metrics: Metrics, processor: str) -> float:
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        if family.name == "chatllm_projection_lag_seconds":
            for sample in family.samples:
                if sample.name.endswith("_count") and sample.labels["processor"] == processor:
                    return sample.value
    raise AssertionError(f"no lag count for {processor}")


def test_every_event_counts_once_per_processor_and_the_summary_sees_them_all() -> None:
    metrics = Metrics()
    # 30 batches of 1,000 events: more than the old per-observation buffer held (20,000 for
    # every processor together, about one second at 3,000 events/s).
    for batch in range(30):
        metrics.observe_lags(("archive", "facts"), [0.1 + batch / 1000] * 999 + [2.0])
    assert _count(metrics, "archive") == _count(metrics, "facts") == 30_000
    summary = metrics.lag_summary()
    assert set(summary) == {"archive", "facts"}
    assert summary["archive"]["samples"] == summary["facts"]["samples"] == 30_000
    assert summary["archive"]["max_s"] == 2.0
    assert 0.1 <= summary["archive"]["p50_s"] <= 0.13


def _samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(metrics.exposition().decode())
        if family.name.startswith(("chatllm_turns", "chatllm_turn_seconds"))
        for sample in family.samples
    }


def test_api_processes_sharing_a_folder_show_their_turns_summed(tmp_path: Path) -> None:
    first, second = Metrics(projections=False), Metrics(projections=False)
    first.shared(tmp_path, 0)
    second.shared(tmp_path, 1)
    first.turns.labels(status="ok", model="m").inc(3)
    first.turn_seconds.observe(0.002)
    second.turns.labels(status="ok", model="m").inc(2)
    second.turns.labels(status="error", model="m").inc()
    second.turn_seconds.observe(0.3)
    second.publish()
    first.publish()
    for shown in (_samples(first), _samples(second)):
        assert shown[("chatllm_turns_total", (("model", "m"), ("status", "ok")))] == 5
        assert shown[("chatllm_turns_total", (("model", "m"), ("status", "error")))] == 1
        assert shown[("chatllm_turn_seconds_count", ())] == 2
        assert shown[("chatllm_turn_seconds_bucket", (("le", "0.0025"),))] == 1
        assert shown[("chatllm_turn_seconds_bucket", (("le", "0.5"),))] == 2
        created = shown[("chatllm_turns_created", (("model", "m"), ("status", "ok")))]
        assert (
            created
            <= min(
                s.value
                for m in (first, second)
                for s in m.turns.collect()[0].samples
                if s.name == "chatllm_turns_created"
            )
            + 1e-6
        )
    # Counts a process made after its last write are its own to show live.
    first.turns.labels(status="ok", model="m").inc()
    assert _samples(first)[("chatllm_turns_total", (("model", "m"), ("status", "ok")))] == 6
    assert _samples(second)[("chatllm_turns_total", (("model", "m"), ("status", "ok")))] == 5
