"""The processors' Faust consumer waits at most `streams.fetch_wait_s` per fetch, not Faust's
hard-coded 1,500 ms (tansu holds such a fetch to its end, records waiting or not)."""

from __future__ import annotations

from pathlib import Path

from infra.services.processors import build_app
from tests.conftest import make_settings


async def test_the_worker_consumer_fetches_with_the_configured_wait(tmp_path: Path) -> None:
    settings = make_settings(datadir=tmp_path, **{"streams.fetch_wait_s": 0.3})
    app, _ = build_app(settings, "127.0.0.1:9")  # nothing connects until it starts
    consumer = app.consumer._thread._create_worker_consumer(app.transport)
    try:
        assert consumer._fetch_max_wait_ms == 300
    finally:
        await consumer.stop()
