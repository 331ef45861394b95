"""`chatllm sql`'s engine on real chDB: a tenant's SELECT sees its own rows only, and what
could read or change anything else is refused with the reason; the store's session is
left as it was (chDB keeps a query's settings for the whole session)."""

from __future__ import annotations

import pytest

from infra.adapters.clickhouse.store import ClickHouseStore
from infra.adapters.clickhouse.tenant_sql import SqlRefused, tenant_sql

pytestmark = pytest.mark.integration


@pytest.fixture
def two_tenants(store: ClickHouseStore) -> ClickHouseStore:
    store.client.command(
        f"INSERT INTO {store.db}.facts (event_id, tenant_id, at, type, text) VALUES"
        " ('e1', 'a', now64(6), 'MessageReceived', 'hello from a'),"
        " ('e2', 'b', now64(6), 'MessageReceived', 'secret of b')"
    )
    return store


def test_a_tenant_sees_its_own_rows_whatever_it_writes(two_tenants: ClickHouseStore) -> None:
    db = two_tenants.db
    mine = tenant_sql(two_tenants, "a", f"SELECT tenant_id, text FROM {db}.facts FINAL")
    assert mine == {"columns": ["tenant_id", "text"], "rows": [["a", "hello from a"]],
                    "truncated": False}  # fmt: skip
    counted = tenant_sql(two_tenants, "b", f"SELECT count() AS n FROM {db}.facts")
    assert counted["rows"] == [[1]]
    capped = tenant_sql(
        two_tenants, "a", f"SELECT text FROM {db}.facts, (SELECT 1 UNION ALL SELECT 2) AS two", 1
    )
    assert capped == {"columns": ["text"], "rows": [["hello from a"]], "truncated": True}


@pytest.mark.parametrize(
    ("query", "why"),
    [
        ("SELECT * FROM file('/etc/passwd', 'LineAsString')", "may not be used"),
        ("SELECT file('/etc/passwd')", "may not be used"),
        ("SELECT * FROM system.tables", "may not be queried"),
        ("SELECT 1 WHERE 1 IN system.numbers", "may not be read"),
        ("SELECT * FROM {db}.facts WHERE 'x' IN (SELECT name FROM system.tables)", "may not"),
        ("SELECT dictGet('d', 'a', 1)", "may not be used"),
        ("SELECT * FROM remote('127.0.0.1', {db}.facts)", "may not be used"),
        ("SELECT 1; DROP TABLE {db}.facts", "one statement"),
        ("DROP TABLE {db}.facts", "only SELECT"),
        ("INSERT INTO {db}.facts SELECT * FROM {db}.facts", "only SELECT"),
        ("SELECT * FROM {db}.facts SETTINGS max_threads = 1", "SETTINGS"),
        ("SELECT * FROM {db}.facts INTO OUTFILE '/tmp/x'", "OUTFILE"),
        ("SELEC nonsense", "not valid"),
        ("", "empty"),
    ],
)
def test_what_could_read_or_change_anything_else_is_refused(
    two_tenants: ClickHouseStore, query: str, why: str
) -> None:
    with pytest.raises(SqlRefused, match=why):
        tenant_sql(two_tenants, "a", query.format(db=two_tenants.db))
    # The store's own session is as it was: writable, no time bound, nothing filtered.
    two_tenants.client.command(
        f"INSERT INTO {two_tenants.db}.facts (event_id, tenant_id, at, type) VALUES"
        " ('e3', 'c', now64(6), 'X')"
    )
    settings = two_tenants.client.query(
        "SELECT getSetting('readonly'), getSetting('max_execution_time')"
    ).result_rows
    assert settings == [(0, 0.0)]
