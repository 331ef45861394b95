"""`chatllm sql`: a caller's own SELECT over the store, read-only and scoped to its tenant.

The caller writes the tables as the docs name them (`chatllm.events`, `chatllm.facts`, ...;
`FINAL` optional). Each is rewritten to a view of the same name in a database of the
tenant's own, which holds only the tenant's rows (deduplicated, as with FINAL). Then
ClickHouse's own parser (EXPLAIN AST) decides what runs: one SELECT, whose every table is
one of those views; no table function (file, url, remote, s3, ...), no SETTINGS, no
INTO OUTFILE or FORMAT. Anything else is refused with the reason. The query runs with a
time and row bound of its own (a query-level SETTINGS clause: nothing carries over to the
store's session).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from infra.adapters.clickhouse.store import ClickHouseStore
from streams.archive import ARCHIVE_TABLE
from streams.projections import ANOMALIES_TABLE, FACTS_TABLE, PRUNES_TABLE

TABLES = (ARCHIVE_TABLE, FACTS_TABLE, ANOMALIES_TABLE, PRUNES_TABLE)
"""What a tenant may query: the archive and the projections (each has a tenant_id)."""
MAX_ROWS = 10_000
TIMEOUT_S = 20
REFUSED_FUNCTIONS = frozenset(
    {"file", "url", "urlcluster", "s3", "s3cluster", "hdfs", "azureblobstorage", "gcs",
     "remote", "remotesecure", "cluster", "clusterallreplicas", "executable", "input",
     "mysql", "postgresql", "mongodb", "redis", "sqlite", "jdbc", "odbc", "joinget",
     "joingetornull", "merge", "view", "viewifpermitted", "numbers", "numbers_mt", "zeros",
     "zeros_mt", "generaterandom", "system", "filesystem", "iceberg", "deltalake", "hudi"}
)  # fmt: skip
"""Functions that read outside the tenant's rows (files, URLs, other servers, other tables,
dictionaries: every dict* function too) or produce rows without end."""


class SqlRefused(ValueError):
    """A query `chatllm sql` does not run, and why."""


def tenant_database(db: str, tenant: str) -> str:
    return f"{db}_tenant_{hashlib.sha256(tenant.encode()).hexdigest()[:16]}"


def _views(store: ClickHouseStore, tenant: str) -> str:
    """The tenant's database of views (made once; cheap to ask again)."""
    tdb = tenant_database(store.db, tenant)
    quoted = tenant.replace("\\", "\\\\").replace("'", "\\'")
    store.client.command(f"CREATE DATABASE IF NOT EXISTS {tdb}")
    for table in TABLES:
        store.client.command(
            f"CREATE VIEW IF NOT EXISTS {tdb}.{table} AS SELECT * FROM {store.db}.{table}"
            f" FINAL WHERE tenant_id = '{quoted}'"
        )
    return tdb


def _checked(store: ClickHouseStore, query: str, tdb: str) -> None:
    """Refuse what is not one plain SELECT over the tenant's views."""
    if ";" in query:
        raise SqlRefused("one statement only (no ';')")
    if re.search(r"\bINTO\s+OUTFILE\b|\bFORMAT\s+\w+\s*$", query, re.I):
        raise SqlRefused("no INTO OUTFILE or FORMAT: the answer's format is chatllm's")
    try:
        tree = [r[0] for r in store.client.query(f"EXPLAIN AST {query}").result_rows]
    except Exception as exc:
        raise SqlRefused(f"not valid ClickHouse SQL: {_first_line(exc)}") from None
    if not tree or not tree[0].startswith("SelectWithUnionQuery"):
        raise SqlRefused("only SELECT queries are run")
    databases = {
        r[0] for r in store.client.query("SELECT name FROM system.databases").result_rows
    } - {tdb}
    local_tables = {
        r[0]
        for r in store.client.query(
            "SELECT name FROM system.tables WHERE database = currentDatabase()"
        ).result_rows
    }
    for i, line in enumerate(tree):
        node = line.strip()
        if node.startswith("Function "):
            name = node.split()[1].lower()
            if name in REFUSED_FUNCTIONS or name.startswith("dict"):
                raise SqlRefused(f"function {node.split()[1]!r} may not be used here")
        # `x IN db.table` (or a bare table of the current database) reads a table through
        # an Identifier, not a TableIdentifier.
        ident = node.split()[1] if node.startswith("Identifier ") else ""
        if ident.split(".")[0] in databases or ident in local_tables:
            raise SqlRefused(f"{ident!r} may not be read here")
        if node == "Set" or node.startswith("Set "):
            raise SqlRefused("no SETTINGS clause")
        if node.startswith("TableIdentifier "):
            name = node.split()[1]
            if not name.startswith(f"{tdb}."):
                allowed = ", ".join(f"{store.db}.{t}" for t in TABLES)
                raise SqlRefused(f"table {name!r} may not be queried here (allowed: {allowed})")
        if (
            node.startswith("Function ")
            and i > 0
            and tree[i - 1].strip().startswith("TableExpression")
        ):
            raise SqlRefused(f"table function {node.split()[1]!r} may not be used")


def _first_line(exc: Exception) -> str:
    text = str(exc)
    match = re.search(r"DB::Exception: (.*?)(?:\. \(|\n|$)", text)
    return (match.group(1) if match else text.splitlines()[0])[:300]


def tenant_sql(
    store: ClickHouseStore, tenant: str, query: str, limit: int = 1000
) -> dict[str, Any]:
    """Run the caller's query over its tenant's rows: {"columns", "rows", "truncated"}."""
    query = query.strip().rstrip(";").strip()
    if not query:
        raise SqlRefused("an empty query")
    tdb = _views(store, tenant)
    names = "|".join(TABLES)
    scoped = re.sub(
        rf"\b{re.escape(store.db)}\.({names})\b(\s+FINAL\b)?", rf"{tdb}.\1", query, flags=re.I
    )
    _checked(store, scoped, tdb)
    limit = max(1, min(limit, MAX_ROWS))
    try:
        result = store.client.query(
            f"SELECT * FROM ({scoped}) LIMIT {limit + 1}"
            f" SETTINGS max_execution_time = {TIMEOUT_S}, readonly = 2"
        )
    except Exception as exc:
        raise SqlRefused(f"the query failed: {_first_line(exc)}") from None
    rows = [list(r) for r in result.result_rows]
    return {
        "columns": list(result.column_names),
        "rows": rows[:limit],
        "truncated": len(rows) > limit,
    }
