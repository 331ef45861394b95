"""chat-llm between a client and an OpenAI-compatible upstream that answers at once
(benchmarks/mock_upstream.py, its own process), against the same client calling the upstream
directly, in the same run: what chat-llm adds to a turn, streamed and not, what it sustains
with 64 clients, and what it costs in CPU and memory across every process of `chatllm up`
(the API, the shards, the store host, Ray's own processes and the broker).

Targets (issue 14, 2 cores): added p50 <= 2 ms; added time to first token <= 2 ms; added gap
between tokens <= 0.1 ms; >= 700 turns/s at 64 clients with p99 <= 250 ms; <= 2 ms of CPU
per turn. Each is printed beside its same-run baseline; the targets are notes.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

from benchmarks.bench_gateway import _launch, _stop, pct
from benchmarks.common import Result, cpu_seconds, drive_turns, process_tree
from infra.adapters.kafka.broker import free_port

CONFIG = """
[limits]
user = ""
tenant = ""
rate_per_s = 0

[log]
level = "WARNING"

[[deployments]]
name = "mock-a"
model = "mock"
provider = "openai"
base_url = "http://127.0.0.1:{upstream}/v1"

[routing]
bands = [{{name = "all", max_complexity = 1.0, model = "mock"}}]
fallbacks = {{}}
"""

BODY = {"model": "mock", "messages": [{"role": "user", "content": "What is Lisbon like?"}]}


def _wait_caught_up(base: str, timeout_s: float = 300.0) -> None:
    """Until every consumer /healthz names has read the whole log (lag 0 or none)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        consumers = httpx.get(f"{base}/healthz", timeout=30).json()["consumers"]
        if all(not c.get("lag") for c in consumers.values()):
            return
        time.sleep(1)


def _cpu_seconds(root: int) -> float:
    """CPU time (user + system) of `root` and every process below it, now."""
    return sum(cpu_seconds(pid) for pid in process_tree(root))


def _rss_by_process(root: int) -> dict[str, float]:
    """Resident MiB of `root` and every process below it, by "name (pid)"."""
    out = {}
    for pid in process_tree(root):
        try:
            pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
            name = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()
        except (OSError, ValueError, IndexError):
            continue
        short = name.split(" ")[0].rsplit("/", 1)[-1] if not name.startswith("ray::") else name
        if "infra.cli" in name:
            short = "chatllm up (API)"
        out[f"{short[:40]} ({pid})"] = pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    return out


def _rss_mib(root: int) -> float:
    return sum(_rss_by_process(root).values())


def _growth(before: dict[str, float], after: dict[str, float], top: int = 3) -> str:
    grown = sorted(((after[k] - before.get(k, 0.0), k) for k in after), reverse=True)[:top]
    return ", ".join(f"{k.split(' (')[0]} {d:+.0f}" for d, k in grown)


async def _sequential(base: str, n: int, stream: bool) -> tuple[list[float], list[float]]:
    """n turns one after another: (latency or time to first token, gaps between tokens)."""
    import aiohttp

    body = json.dumps({**BODY, "stream": stream})
    firsts: list[float] = []
    gaps: list[float] = []
    async with aiohttp.ClientSession(base) as session:
        for _ in range(n):
            started = time.perf_counter()
            async with session.post(
                "/v1/chat/completions", data=body, headers={"content-type": "application/json"}
            ) as response:
                if response.status != 200:
                    raise RuntimeError(f"{response.status}: {await response.text()}")
                if not stream:
                    await response.read()
                    firsts.append(time.perf_counter() - started)
                    continue
                last = None
                async for line in response.content:
                    if not line.startswith(b"data: {"):
                        continue
                    choices = json.loads(line[6:]).get("choices") or [{}]
                    if not (choices[0].get("delta") or {}).get("content"):
                        continue
                    now = time.perf_counter()
                    if last is None:
                        firsts.append(now - started)
                    else:
                        gaps.append(now - last)
                    last = now
    return firsts, gaps


async def _concurrent(base: str, n: int, clients: int) -> tuple[list[float], float]:
    # Each client task has its own connection (a session of its own).
    return await drive_turns(base, json.dumps(BODY), n, clients, own_connection=True)


def run(
    sequential: int = 400,
    concurrent_turns: int = 3200,
    clients: int = 64,
    soak_turns: int | None = None,
) -> list[Result]:
    """`soak_turns` (BENCH_SOAK_TURNS, default 100,000): turns run after the measurements,
    before latency and memory are measured again (0 skips the soak)."""
    import sys

    if soak_turns is None:
        soak_turns = int(os.environ.get("BENCH_SOAK_TURNS", "100000"))

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        upstream_port = free_port()
        upstream, upstream_base = _launch(
            [sys.executable, "-m", "benchmarks.mock_upstream", str(upstream_port)],
            upstream_port,
            {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
            workdir,
        )
        try:
            port = free_port()
            (workdir / "chatllm.toml").write_text(CONFIG.format(upstream=upstream_port))
            env = {
                **os.environ,
                "CHATLLM_HTTP__PORT": str(port),
                "CHATLLM_CLICKHOUSE__PATH": str(workdir / "chdb"),
                "CHATLLM_STREAMS__DATADIR": str(workdir / "work"),
            }
            stack, base = _launch([sys.executable, "-m", "infra.cli", "up"], port, env, workdir)
            try:
                idle_rss = _rss_mib(stack.pid)
                # Warm up both paths (connections, code paths, shard caches).
                asyncio.run(_sequential(upstream_base, 100, False))
                asyncio.run(_sequential(base, 200, False))
                asyncio.run(_sequential(base, 50, True))
                direct, _ = asyncio.run(_sequential(upstream_base, sequential, False))
                through, _ = asyncio.run(_sequential(base, sequential, False))
                direct_first, direct_gaps = asyncio.run(_sequential(upstream_base, 200, True))
                first, gaps = asyncio.run(_sequential(base, 200, True))
                asyncio.run(_concurrent(base, 640, clients))
                cpu_before = _cpu_seconds(stack.pid)
                client_before = time.process_time()
                samples, throughput = asyncio.run(_concurrent(base, concurrent_turns, clients))
                cpu_per_turn = (_cpu_seconds(stack.pid) - cpu_before) / concurrent_turns * 1000
                client_cpu = (time.process_time() - client_before) / concurrent_turns * 1000
                _, direct_throughput = asyncio.run(
                    _concurrent(upstream_base, concurrent_turns, clients)
                )
                loaded = _rss_by_process(stack.pid)
                loaded_rss = sum(loaded.values())
                soaked_rss, soaked, total, soaked_by = loaded_rss, through, 0, loaded
                if soak_turns:
                    done = sequential + 200 + 250 + 640 + concurrent_turns * 2
                    soak = max(soak_turns - done, 0)
                    asyncio.run(_concurrent(base, soak, clients))
                    total = done + soak
                    # 64 clients outrun the (niced) store host: let it catch up first, or
                    # "after 100,000 turns" would measure the backlog being written.
                    _wait_caught_up(base)
                    soaked, _ = asyncio.run(_sequential(base, sequential, False))
                    soaked_by = _rss_by_process(stack.pid)
                    soaked_rss = sum(soaked_by.values())
            finally:
                _stop(stack)
        finally:
            _stop(upstream)

    added50 = pct(through, 0.5) - pct(direct, 0.5)
    added99 = pct(through, 0.99) - pct(direct, 0.99)
    return [
        Result(
            "added latency p50, c=1, not streamed",
            "ms",
            added50,
            "the upstream alone, p50",
            pct(direct, 0.5),
            higher_is_better=False,
            note=f"through chat-llm p50 {pct(through, 0.5):.2f} ms; target: added <= 2 ms",
        ),
        Result(
            "added latency p99, c=1, not streamed",
            "ms",
            added99,
            "the upstream alone, p99",
            pct(direct, 0.99),
            higher_is_better=False,
            note=f"through chat-llm p99 {pct(through, 0.99):.2f} ms",
        ),
        Result(
            "added time to first token p50, streamed",
            "ms",
            pct(first, 0.5) - pct(direct_first, 0.5),
            "the upstream alone, first token p50",
            pct(direct_first, 0.5),
            higher_is_better=False,
            note="target: added <= 2 ms",
        ),
        Result(
            "added gap between tokens p50, streamed",
            "ms",
            max(pct(gaps, 0.5) - pct(direct_gaps, 0.5), 0.0),
            "the upstream alone, gap p50",
            pct(direct_gaps, 0.5),
            higher_is_better=False,
            note=f"through chat-llm gap p50 {pct(gaps, 0.5):.3f} ms; target: added <= 0.1 ms",
        ),
        Result(
            f"turns/s through chat-llm, {clients} clients",
            "turns/s",
            throughput,
            "the upstream alone, same clients",
            direct_throughput,
            note=f"p99 {pct(samples, 0.99):.0f} ms (target p99 <= 250 ms)",
            target=700.0,
        ),
        Result(
            "CPU per turn, every process of chatllm up",
            "ms",
            cpu_per_turn,
            "the client's own CPU per turn",
            client_cpu,
            higher_is_better=False,
            note=f"at {clients} clients; target <= 2 ms",
        ),
        Result(
            "resident memory of chatllm up, after the load",
            "MiB",
            loaded_rss,
            "idle, right after start",
            idle_rss,
            higher_is_better=False,
            note="every process below chatllm up (Ray's included)",
        ),
        *(
            [
                Result(
                    f"resident memory after {total:,} turns",
                    "MiB",
                    soaked_rss,
                    f"after the first {concurrent_turns * 2 + 1490:,} turns",
                    loaded_rss,
                    higher_is_better=False,
                    note=f"grew most (MiB): {_growth(loaded, soaked_by)}; target: flat",
                ),
                Result(
                    f"added latency p50 after {total:,} turns",
                    "ms",
                    pct(soaked, 0.5) - pct(direct, 0.5),
                    "added p50 right after start",
                    added50,
                    higher_is_better=False,
                    note="target: within 20% of right after start",
                ),
            ]
            if soak_turns
            else []
        ),
    ]
