"""The ClickHouse store on real chDB: migrations, dedup, clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from events import encode
from infra.config import ClickHouseConfig
from infra.store import ClickHouseStore, StoreError
from streams.archive import archive_row
from tests.factories import make_event

pytestmark = pytest.mark.integration


def test_migrations_are_idempotent(store: ClickHouseStore) -> None:
    # The fixture migrated once; again applies nothing and changes nothing.
    assert store.migrate() == []
    assert store.migrate() == []
    versions = store.client.query(
        f"SELECT version FROM {store.db}.schema_migrations FINAL"
    ).result_rows
    assert versions == [(1,)]


def test_duplicate_rows_are_read_once(store: ClickHouseStore) -> None:
    events = [make_event("ctx-1", v) for v in range(1, 4)]
    rows = [
        archive_row(e, encode(e), topic="t", partition=0, offset=v) for v, e in enumerate(events)
    ]
    store.insert_archive(rows)
    store.insert_archive(rows)  # at-least-once delivery wrote them again
    assert store.archive_counts() == (6, 3)  # stored twice before any merge ...
    assert [r.event_id for r in store.stream_events("t1", "ctx-1")] == [e.event_id for e in events]


def test_timestamps_keep_microseconds_in_utc(store: ClickHouseStore) -> None:
    event = make_event()
    store.insert_archive([archive_row(event, encode(event), topic="t", partition=0, offset=0)])
    (record,) = store.stream_events("t1", "ctx-1")
    assert record.occurred_at.replace(tzinfo=event.occurred_at.tzinfo) == event.occurred_at


def test_a_second_chdb_path_in_one_process_is_a_clear_error(
    store: ClickHouseStore, tmp_path: Path
) -> None:
    with pytest.raises(StoreError, match="one data path per process"):
        ClickHouseStore(ClickHouseConfig(path=str(tmp_path / "other"))).open()


def test_a_path_held_by_another_process_is_a_clear_error(store: ClickHouseStore) -> None:
    code = (
        "from infra.config import ClickHouseConfig\nfrom infra.store import ClickHouseStore\n"
        f"ClickHouseStore(ClickHouseConfig(path={store.config.path!r})).open()"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "another process has this chDB path open" in result.stderr
