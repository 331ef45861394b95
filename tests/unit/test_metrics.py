"""The projection lag metrics: one observation per event and processor, and a live summary
that covers its whole window at any rate."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from infra.metrics import Metrics


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
