"""Replay from the archive, measured in the same run:

- rebuilding every projection from 1 million archived events, against the raw scan rate of
  the same archive (the same keyset pages, read and dropped) - target: >= 50,000 events/s;
- reconstructing one context of 1,000 events at a moment (time travel) - target: < 50 ms.
"""

from __future__ import annotations

import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from rich.progress import Progress

from actors.history import point_in_time
from benchmarks.common import Result
from events import decode, encode
from infra.adapters.clickhouse.rebuilds import archive_pages
from infra.adapters.clickhouse.store import ClickHouseStore
from infra.config import ClickHouseConfig
from infra.services.rebuild import PAGE, rebuild
from tests.factories import make_turn

TENANT = "bench"


def _templates() -> list[str]:
    """One turn's eight events as JSON, with placeholders the SQL fills in per row."""
    turn = make_turn(1, context="__SID__", version=1, tenant_id=TENANT)
    out = []
    for event in turn:
        text = encode(event).decode()
        text = text.replace(event.event_id, "__EID__").replace('"turn-1"', '"__TURN__"')
        text = text.replace(f'"stream_version":{event.stream_version}', '"stream_version":__VER__')
        out.append(text)
    return out


def _fill(store: ClickHouseStore, total: int, big_context: int) -> None:
    """`total` archived events: turns over 5,000 contexts, plus one context of
    `big_context` events; generated in SQL from one real turn's bodies."""
    templates = "[" + ", ".join("'" + t.replace("'", "\\'") + "'" for t in _templates()) + "]"
    step = 250_000
    with Progress(transient=True) as progress:
        task = progress.add_task("archive", total=total)
        for offset in range(0, total, step):
            count = min(step, total - offset)
            store.client.command(
                f"INSERT INTO {store.db}.events (event_id, type, schema, occurred_at, stream_id,"
                " stream_version, tenant_id, user_id, trace_id, span_id, correlation_id,"
                " causation_id, body, topic, partition, offset)"
                " SELECT eid, JSONExtractString(b, 'type'), 1, now64(6), sid, ver, 'bench', 'u1',"
                " '', '', turn, '', b, 't', 0, n"
                " FROM (SELECT n, toString(generateUUIDv7(n)) AS eid,"
                f" if(n < {big_context}, 'ctx-big', concat('ctx-', toString(intDiv(n, 8) % 5000)))"
                " AS sid,"
                f" if(n < {big_context}, n + 1, intDiv(n, 40000) * 8 + n % 8 + 1) AS ver,"
                " concat('turn-', toString(intDiv(n, 8))) AS turn,"
                f" replaceAll(replaceAll(replaceAll(replaceAll({templates}[n % 8 + 1],"
                " '__EID__', eid), '__SID__', sid), '__VER__', toString(ver)),"
                " '__TURN__', turn) AS b"
                f" FROM (SELECT number + {offset} AS n FROM numbers({count})))"
            )
            progress.advance(task, count)


def run(total: int = 1_000_000, big_context: int = 1000) -> list[Result]:
    with tempfile.TemporaryDirectory() as tmp:
        store = ClickHouseStore(ClickHouseConfig(path=str(Path(tmp) / "chdb"), database="bench"))
        store.open().migrate()
        try:
            _fill(store, total, big_context)
            time.sleep(1.2)  # nothing archived "during" the rebuild
            started = time.perf_counter()
            scanned = sum(len(page) for page in archive_pages(store, "1", {}, PAGE))
            scan_rate = scanned / (time.perf_counter() - started)
            report = rebuild(store, ["facts", "anomalies", "prunes"])
            assert report.events == total and report.skipped == 0, report

            at = datetime.now(UTC)
            timings, reads = [], []
            for _ in range(5):  # the baseline: the same archive read alone, no decode or fold
                began = time.perf_counter()
                store.stream_events(TENANT, "ctx-big")
                reads.append((time.perf_counter() - began) * 1000)
            for _ in range(5):
                began = time.perf_counter()
                records = store.stream_events(TENANT, "ctx-big")
                events = [decode(r.body.encode()) for r in records]
                moment = point_in_time("ctx-big", at, events, [])
                timings.append((time.perf_counter() - began) * 1000)
            assert moment.events == big_context
        finally:
            store.close()
    return [
        Result(
            f"rebuild all projections from {total / 1e6:.0f}M archived events",
            "events/s",
            report.rate,
            "raw keyset scan of the same archive",
            scan_rate,
            note=f"rows {report.rows}",
            target=50_000,
        ),
        Result(
            f"one context of {big_context:,} events at a moment",
            "ms",
            min(timings),
            "the archive read alone (no decode, no fold)",
            min(reads),
            higher_is_better=False,
            note="archive read + decode + fold (time travel)",
            target=50.0,
        ),
    ]
