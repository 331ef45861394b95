"""The gateway's own overhead per chat turn, through the HTTP API of a real `chatllm up`
(demo model, zero latency), against what it stands on, measured in the same run:
calling the demo model directly, one blocking Ray actor round trip, one acks=all produce.
Also the sustained turns/s with 64 concurrent clients.

Targets (2 cores): p50 overhead <= 2x one blocking actor round trip; >= 300 turns/s at 64.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from actors.ports import ChatMessage
from benchmarks.common import Result, cpu_seconds, drive_turns, process_tree
from infra.adapters.kafka.broker import EmbeddedBroker, free_port
from infra.adapters.models import DemoModel


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def _direct_model(n: int) -> list[float]:
    model = DemoModel()
    messages = [ChatMessage(role="user", content="What is the capital of Portugal?")]
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        await model.complete(messages)
        samples.append(time.perf_counter() - started)
    return samples


def _start_service(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env: dict[str, str] = {
        **os.environ,
        "CHATLLM_HTTP__PORT": str(port),
        "CHATLLM_CLICKHOUSE__PATH": str(workdir / "chdb"),
        "CHATLLM_STREAMS__DATADIR": str(workdir),
        "CHATLLM_LIMITS__USER": "",  # measure the path, not the limits
        "CHATLLM_LIMITS__TENANT": "",
        "CHATLLM_LIMITS__RATE_PER_S": "0",
        "CHATLLM_LOG__LEVEL": "WARNING",
    }
    return _launch([sys.executable, "-m", "infra.cli", "up"], port, env, workdir)


def _launch(
    argv: list[str], port: int, env: dict[str, str], workdir: Path
) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen(
        argv,
        env=env,
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return proc, base
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{' '.join(argv)} did not start")


def _pid_below(root: int, needle: str) -> int | None:
    """The first process below `root` whose command line contains `needle`."""
    for pid in process_tree(root)[1:]:
        try:
            if needle in Path(f"/proc/{pid}/cmdline").read_text():
                return pid
        except OSError:
            continue
    return None


def _tree_cpu(root: int) -> float:
    """CPU seconds of `root` and every process below it."""
    return sum(cpu_seconds(pid) for pid in process_tree(root))


def _wait_for_processors(base: str, timeout_s: float = 90.0) -> None:
    """Until the processors' worker holds its partitions (it joins its group after the API
    answers); the run goes on after `timeout_s` and the note then says none reported."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        workers = httpx.get(f"{base}/v1/live", timeout=10).json().get("processors") or []
        if any(w["partitions"] and not w["recovering"] for w in workers):
            return
        time.sleep(0.5)


def _processors_note(live: dict[str, Any]) -> str:
    workers = live.get("processors") or []
    if not workers:
        return "no processors' worker reported (anomalies off?)"
    p99 = max((w.get("lag_p99_10s") or 0.0) for w in workers)
    backlog = sum(w["lag_records"] for w in workers)
    return (
        f"lag p99 over the last 10 s {p99:.2f} s (target < 1 s),"
        f" records behind after the run: {backlog}"
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def _floor_turns(
    workdir: Path, bootstrap: str, sequential: int, concurrent: int = 0, clients: int = 1
) -> tuple[list[float], float]:
    """The same clients against benchmarks.floor_app (HTTP + one Ray hop + one ack): the
    sequential turns' latencies, and the rate of `concurrent` turns from `clients`."""
    port = free_port()
    repo = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": repo}
    argv = [sys.executable, "-m", "benchmarks.floor_app", str(port), bootstrap]
    proc, base = _launch(argv, port, env, workdir)
    try:
        asyncio.run(_turns(base, 200, 1))
        turns, _ = asyncio.run(_turns(base, sequential, 1))
        rate = asyncio.run(_turns(base, concurrent, clients))[1] if concurrent else float("nan")
        return turns, rate
    finally:
        _stop(proc)


async def _turns(base: str, n: int, clients: int) -> tuple[list[float], float]:
    body = json.dumps(
        {
            "model": "demo-fast",
            "messages": [{"role": "user", "content": "What is the capital of Portugal?"}],
        }
    )
    return await drive_turns(base, body, n, clients)


class _Echo:
    def ping(self) -> int:
        return 1


def _ray_round_trips(n: int) -> list[float]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        echo = ray.remote(_Echo).options(num_cpus=0).remote()  # type: ignore[attr-defined]
        ray.get([echo.ping.remote() for _ in range(50)])  # warm up
        samples = []
        for _ in range(n):
            started = time.perf_counter()
            ray.get(echo.ping.remote())
            samples.append(time.perf_counter() - started)
        return samples
    finally:
        ray.shutdown()


async def _produce_acks(bootstrap: str, n: int) -> list[float]:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    await producer.start()
    try:
        for _ in range(20):
            await producer.send_and_wait("bench-acks", b"warm", key=b"k")
        samples = []
        for _ in range(n):
            started = time.perf_counter()
            await producer.send_and_wait("bench-acks", b'{"event": "x"}', key=b"k")
            samples.append(time.perf_counter() - started)
        return samples
    finally:
        await producer.stop()


def run(sequential: int = 400, concurrent_turns: int = 3200, clients: int = 64) -> list[Result]:
    direct = asyncio.run(_direct_model(2000))
    with tempfile.TemporaryDirectory() as tmp:
        proc, base = _start_service(Path(tmp))
        try:
            _wait_for_processors(base)  # steady state: their lag, not their start, is measured
            asyncio.run(_turns(base, 200, 1))  # warm up: connections, code paths, shard caches
            turns, _ = asyncio.run(_turns(base, sequential, 1))
            asyncio.run(_turns(base, 640, clients))
            processors = _pid_below(proc.pid, "--processors")
            cpu_before, stack_before = cpu_seconds(processors), _tree_cpu(proc.pid)
            _, throughput = asyncio.run(_turns(base, concurrent_turns, clients))
            processors_cpu = (cpu_seconds(processors) - cpu_before) / concurrent_turns * 1000
            stack_cpu = (_tree_cpu(proc.pid) - stack_before) / concurrent_turns * 1000
            time.sleep(1)  # the last observations judged
            live = httpx.get(f"{base}/v1/live", timeout=10).json()
        finally:
            _stop(proc)
        with EmbeddedBroker() as broker:
            acks = asyncio.run(_produce_acks(broker.bootstrap_servers, 1000))
            floor, floor_rate = _floor_turns(
                Path(tmp), broker.bootstrap_servers, sequential, concurrent_turns, clients
            )
    ray_rtt = _ray_round_trips(1000)

    overhead50 = pct(turns, 0.5) - pct(direct, 0.5)
    overhead99 = pct(turns, 0.99) - pct(direct, 0.99)
    ray50, ray99 = pct(ray_rtt, 0.5), pct(ray_rtt, 0.99)
    note = (
        f"turn p50 {pct(turns, 0.5):.2f} ms, p99 {pct(turns, 0.99):.2f} ms;"
        f" direct model p50 {pct(direct, 0.5) * 1000:.0f} µs"
    )
    return [
        Result(
            "gateway overhead per turn, p50 (HTTP)",
            "ms",
            overhead50,
            "2 x blocking Ray round trip p50",
            2 * ray50,
            higher_is_better=False,
            note=note + "; target ratio >= 1",
        ),
        Result(
            "gateway overhead per turn, p99 (HTTP)",
            "ms",
            overhead99,
            "2 x blocking Ray round trip p99",
            2 * ray99,
            higher_is_better=False,
        ),
        Result(
            "floor: raw ASGI + 1 Ray hop + 1 ack, p50",
            "ms",
            pct(floor, 0.5) - pct(direct, 0.5),
            "2 x blocking Ray round trip p50",
            2 * ray50,
            higher_is_better=False,
            note=(
                f"p99 {pct(floor, 0.99):.2f} ms; the least any request path on this stack"
                f" costs here; gateway p50 / floor p50 ="
                f" {overhead50 / max(pct(floor, 0.5) - pct(direct, 0.5), 1e-9):.2f}"
            ),
        ),
        Result(
            "one acks=all produce, p50",
            "ms",
            pct(acks, 0.5),
            "blocking Ray round trip p50",
            ray50,
            higher_is_better=False,
            note=f"produce p99 {pct(acks, 0.99):.2f} ms, Ray p99 {ray99:.2f} ms",
        ),
        Result(
            "anomaly processors (Faust): CPU per turn at that rate",
            "ms",
            processors_cpu,
            "every process of chatllm up, per turn",
            stack_cpu,
            higher_is_better=False,
            note=_processors_note(live),
        ),
        Result(
            f"sustained turns/s, {clients} clients",
            "turns/s",
            throughput,
            "the floor app (HTTP + 1 Ray hop + 1 ack), same clients",
            floor_rate,
            note=f"{concurrent_turns} turns in all",
            target=300.0,
        ),
    ]
