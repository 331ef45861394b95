"""The README's examples are executed, so they cannot drift from the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from events import decode, encode
from infra.adapters.clickhouse.store import ClickHouseStore
from infra.config import load_config
from streams.archive import archive_row

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_readme_config_example_loads_with_every_profile(tmp_path: Path) -> None:
    (example,) = [b for b in blocks("toml") if "[profiles" in b]
    path = tmp_path / "chatllm.toml"
    path.write_text(example)
    assert load_config(path, env={}).settings.tenant == "acme"
    prod = load_config(path, "prod", env={}).settings
    assert prod.broker.bootstrap_servers == "kafka-1:9092,kafka-2:9092"
    assert prod.ray.address == "ray://ray-head:10001"


def test_every_readme_config_snippet_is_valid_config(tmp_path: Path) -> None:
    snippets = [b for b in blocks("toml") if "[[steps]]" not in b]
    assert len(snippets) >= 3
    for n, snippet in enumerate(snippets):
        path = tmp_path / f"snippet-{n}.toml"
        path.write_text(snippet)
        load_config(path, env={})


def test_readme_event_example_is_a_valid_event() -> None:
    (example,) = blocks("json")
    event = decode(example)
    assert event.type == "MessageReceived" and event.stream_version == 2


@pytest.mark.integration
def test_readme_sql_example_runs(store: ClickHouseStore) -> None:
    (example,) = blocks("json")
    event = decode(example)
    store.insert_archive([archive_row(event, encode(event), topic="t", partition=0, offset=0)] * 2)
    (sql,) = blocks("sql")
    rows = store.client.query(sql.replace("chatllm.events", f"{store.db}.events")).result_rows
    assert rows == [(2, "MessageReceived", "Hello!")]


@pytest.mark.integration
def test_the_sql_examples_of_docs_queries_run(store: ClickHouseStore) -> None:
    """docs/queries.md's SQL against real projections (the views it documents exist)."""
    from datetime import UTC, datetime, timedelta

    from streams.ports import ProjectionBatch
    from streams.projections import project, table_of
    from tests.factories import make_turn

    now = datetime.now(UTC) - timedelta(minutes=5)
    events = make_turn(1, tenant_id="acme", at=now) + make_turn(
        2, version=9, tenant_id="acme", outcome="failed", at=now
    )
    batch = ProjectionBatch()
    for event in events:
        row = project(event)
        assert row is not None
        batch.rows.setdefault(table_of(row), []).append(row)
    store.write(batch)
    docs = (Path(__file__).resolve().parents[2] / "docs" / "queries.md").read_text()
    recent, errors = re.findall(r"```sql\n(.*?)```", docs, flags=re.S)[0].split(";")[:2]
    run = [
        store.client.query(q.replace("chatllm.", f"{store.db}.")).result_rows
        for q in (recent, errors)
    ]
    assert [r[1] for r in run[0]] == ["ctx-1", "ctx-1"]
    assert [(r[1], r[2]) for r in run[1]] == [("network", 1)]
