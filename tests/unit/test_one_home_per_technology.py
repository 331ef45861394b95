"""Each technology has one home in infra/adapters/: every aiokafka client is made in
infra/adapters/kafka/clients.py (streams/loop.py makes the batch loop's own: streams may not
import infra), and no module outside infra/adapters/clickhouse/ holds a ClickHouse client."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [
    p
    for package in ("infra", "streams", "actors", "events")
    for p in (ROOT / package).rglob("*.py")
]


def _offenders(pattern: str, allowed: set[str]) -> list[str]:
    found = []
    for path in SOURCES:
        relative = str(path.relative_to(ROOT))
        if relative in allowed:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(pattern, line):
                found.append(f"{relative}:{number}: {line.strip()}")
    return found


def test_every_kafka_client_is_made_in_the_kafka_adapter() -> None:
    allowed = {"infra/adapters/kafka/clients.py", "streams/loop.py"}
    assert _offenders(r"AIOKafka(Consumer|Producer|AdminClient)\(", allowed) == []


def test_only_the_clickhouse_adapter_opens_a_clickhouse_client() -> None:
    allowed = {"infra/adapters/clickhouse/store.py"}
    assert _offenders(r"clickhouse_connect\.get_client\(|import chdb", allowed) == []


def test_all_sql_runs_in_the_clickhouse_adapter() -> None:
    """No service, route or command talks to the store's client: they call its methods."""
    adapter = {str(p.relative_to(ROOT)) for p in (ROOT / "infra/adapters/clickhouse").glob("*.py")}
    assert _offenders(r"\.client\.(query|command|insert)\(", adapter) == []
