"""Beyond one machine, by configuration only: `chatllm up` against a Ray cluster it did not
start (`ray start --head`, its own processes) and an external Kafka-API broker. The same
code; docs/deploy.md tells the rest (a ClickHouse server by URL, KubeRay, workers)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest

from infra.adapters.kafka.broker import EmbeddedBroker, free_port
from tests.e2e.conftest import start_service, stop_service

pytestmark = pytest.mark.e2e

RAY = str(Path(sys.executable).with_name("ray"))


def test_up_on_an_external_ray_cluster_and_broker(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    # Ray's socket paths must stay under 108 bytes: a short temp dir of its own.
    temp = tempfile.mkdtemp(prefix="rc-", dir="/tmp")
    started = subprocess.run(
        [RAY, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
         f"--temp-dir={temp}"],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr[-2000:]
    broker = EmbeddedBroker().start()
    try:
        service = start_service(
            tmp_path,
            config=f"""
[broker]
bootstrap_servers = "{broker.bootstrap_servers}"

[ray]
address = "auto"   # the cluster this machine belongs to (ray start wrote where it is)
namespace = "chatllm-cluster-test"
""",
        )
        try:
            turn = httpx.post(
                f"{service.base}/v1/contexts/cluster-1/messages",
                json={"content": "hello from the cluster"},
                timeout=60,
            )
            assert turn.status_code == 200, turn.text
            assert turn.json()["ok"]
            # The shards ran on that cluster: `up` joined it rather than starting Ray.
            log = service.log()
            assert "Connected to Ray cluster" in log and "Started a local Ray" not in log
        finally:
            stop_service(service)
    finally:
        broker.stop()
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
