"""Fault: the projection worker is SIGKILLed between writing rows and committing offsets.

Must hold: nothing is lost and nothing duplicated once a new worker has taken over: the
archive holds every event once and every projection equals the fold of its pure projector
over the log."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from events import encode
from infra.adapters.kafka.broker import EmbeddedBroker
from streams.app import ARCHIVER_ID
from streams.projections import fold
from tests.conftest import Topics
from tests.faults.test_store_outage import committed_total
from tests.integration.test_archive_worker import produce, traffic

pytestmark = pytest.mark.integration


def worker_env(
    broker: EmbeddedBroker, topics: Topics, tmp_path: Path, **settings: str
) -> dict[str, str]:
    """The environment of a `chatllm worker` on the test's broker, topics and chDB path, with
    quick group joins, and `settings` (section__key=value) on top."""
    return {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "CHATLLM_BROKER__BOOTSTRAP_SERVERS": broker.bootstrap_servers,
        "CHATLLM_TOPICS__EVENTS": topics.events,
        "CHATLLM_TOPICS__DEADLETTER": topics.deadletter,
        "CHATLLM_CLICKHOUSE__PATH": str(tmp_path / "chdb"),
        "CHATLLM_STREAMS__DATADIR": str(tmp_path),
        "CHATLLM_STREAMS__SESSION_TIMEOUT_S": "3.0",
        "CHATLLM_STREAMS__HEARTBEAT_INTERVAL_S": "0.5",
        "CHATLLM_STREAMS__REBALANCE_TIMEOUT_S": "1.0",
        **{f"CHATLLM_{key.upper()}": value for key, value in settings.items()},
    }


class WorkerProcess:
    """`chatllm worker` in its own process, with its progress lines collected."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "infra.cli", "worker"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.archived = 0
        self.changed_at = time.monotonic()
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("archived "):
                count = int(line.split()[1])
                if count != self.archived:
                    self.archived, self.changed_at = count, time.monotonic()

    def wait_for(self, predicate: object, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():  # type: ignore[operator]
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("worker did not get there:\n" + "".join(self.lines[-30:]))
            time.sleep(0.05)


COUNT_SCRIPT = """
import json
from infra.config import load_config
from infra.adapters.clickhouse.store import ClickHouseStore

from streams.projections import ANOMALIES_TABLE, FACTS_TABLE, PRUNES_TABLE

store = ClickHouseStore(load_config().settings.clickhouse).open()
sql = f"SELECT count(), uniqExact(event_id) FROM {store.db}.events FINAL"
names = (FACTS_TABLE, ANOMALIES_TABLE, PRUNES_TABLE)
tables = {t: [repr(r) for r in store.projected_rows(t)] for t in names}
print(json.dumps({"archive": store.client.query(sql).result_rows[0], "tables": tables}))
"""


def read_back(env: dict[str, str]) -> dict[str, Any]:
    """The archive's (rows after dedup, distinct ids) and each projection's rows (as reprs),
    read by another process (chDB: one path per process)."""
    out = subprocess.run(
        [sys.executable, "-c", COUNT_SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    found: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return found


def test_sigkill_mid_stream_then_restart(
    broker: EmbeddedBroker, topics: Topics, tmp_path: Path
) -> None:
    env = worker_env(
        broker,
        topics,
        tmp_path,
        # Small batches and a slow commit: a kill is likely to land between write and commit.
        streams__batch_size="100",
        streams__commit_interval_s="2.0",
    )
    events = traffic(contexts=10, turns=40)
    asyncio.run(produce(broker, topics.events, [(e.stream_id.encode(), encode(e)) for e in events]))

    # Step 1: the first worker is SIGKILLed once it has archived part of the log.
    first = WorkerProcess(env)
    first.wait_for(lambda: first.archived >= 500, 90)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    assert first.archived < len(events), "the kill must land mid-stream"
    # Where the group's commit stood when the kill landed: the rows written past it were
    # archived but not committed, so they must come again (the kill landed between write
    # and commit).
    committed = asyncio.run(committed_total(broker, topics.events, ARCHIVER_ID))
    redelivered = first.archived - committed
    assert redelivered > 0, f"the kill landed after a commit ({committed} of {first.archived})"

    # Step 2: a new worker re-reads from the last committed offset and goes quiet when caught up.
    second = WorkerProcess(env)
    second.wait_for(lambda: second.archived > 0 and time.monotonic() - second.changed_at > 5, 120)
    second.proc.send_signal(signal.SIGTERM)
    assert second.proc.wait(60) == 0, "".join(second.lines[-30:])

    # Step 3: the archive holds every event exactly once (re-deliveries deduplicated), and
    # each projection is exactly its projector's fold over the log: no duplicate, no gap.
    found = read_back(env)
    assert found["archive"] == [len(events), len(events)]
    for table, rows in fold(events).items():
        assert found["tables"][table] == [repr(rows[k]) for k in sorted(rows)], table
    # The second worker started from that commit: it wrote again the rows re-delivered, and
    # everything after them, each once.
    assert second.archived == len(events) - committed
    assert first.archived + second.archived == len(events) + redelivered
