"""The table operations that rebuilding and restoring take: shadow copies of projection
tables swapped in atomically (EXCHANGE TABLES), and scans of the archive (counts, keyset
pages in primary-key order, what arrived since a moment). Blocking; the services call them
on the store's thread."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

from infra.adapters.clickhouse.store import ClickHouseStore
from streams.archive import ARCHIVE_TABLE

SHADOW = "__rebuild"
"""The suffix of a projection table's shadow copy while it is rebuilt."""


def shadow_create(store: ClickHouseStore, table: str, keep_outside: tuple[str, Any] | None) -> None:
    """A fresh shadow of `table`; with `keep_outside` (a WHERE clause and its parameters),
    the rows outside it are copied over, so a partial rebuild keeps them."""
    db, c = store.db, store.client
    c.command(f"DROP TABLE IF EXISTS {db}.{table}{SHADOW}")
    c.command(f"CREATE TABLE {db}.{table}{SHADOW} AS {db}.{table}")
    if keep_outside is not None:
        inside, params = keep_outside
        c.command(
            f"INSERT INTO {db}.{table}{SHADOW} SELECT * FROM {db}.{table} FINAL"
            f" WHERE NOT ({inside})",
            parameters=params,
        )


def shadow_swap(store: ClickHouseStore, table: str) -> None:
    """The shadow becomes the table, atomically (the old rows become the shadow)."""
    store.client.command(f"EXCHANGE TABLES {store.db}.{table} AND {store.db}.{table}{SHADOW}")


def shadow_drop(store: ClickHouseStore, table: str) -> None:
    store.client.command(f"DROP TABLE IF EXISTS {store.db}.{table}{SHADOW}")


def archive_count(store: ClickHouseStore, where: str, params: dict[str, Any]) -> int:
    """Archived events in `where`."""
    rows = store.client.query(
        f"SELECT count() FROM {store.db}.{ARCHIVE_TABLE} WHERE {where}", parameters=params
    ).result_rows
    return int(rows[0][0])


def archive_arrived_since(
    store: ClickHouseStore, where: str, params: dict[str, Any], since: datetime
) -> list[str]:
    """The bodies of the events in `where` that the archive received at `since` or later."""
    rows = store.client.query(
        f"SELECT body FROM {store.db}.{ARCHIVE_TABLE} WHERE {where}"
        " AND archived_at >= {fresh_since:DateTime64(6, 'UTC')}",
        parameters={**params, "fresh_since": since},
    ).result_rows
    return [r[0] for r in rows]


def archive_pages(
    store: ClickHouseStore, where: str, params: dict[str, Any], page: int
) -> Iterator[list[str]]:
    """The archived bodies in `where`, page by page, in primary-key order (a keyset scan)."""
    key = "(tenant_id, stream_id, stream_version, event_id)"
    after: tuple[Any, ...] | None = None
    while True:
        page_where, page_params = where, dict(params)
        if after is not None:
            page_where += (
                f" AND {key} > ({{a0:String}}, {{a1:String}}, {{a2:UInt64}}, {{a3:String}})"
            )
            page_params.update(a0=after[0], a1=after[1], a2=after[2], a3=after[3])
        result = store.client.query(
            f"SELECT tenant_id, stream_id, stream_version, event_id, body"
            f" FROM {store.db}.{ARCHIVE_TABLE} WHERE {page_where} ORDER BY {key} LIMIT {page}",
            parameters=page_params,
        ).result_rows
        if not result:
            return
        after = tuple(result[-1][:4])
        yield [r[4] for r in result]


def archived_count(store: ClickHouseStore) -> int:
    """Distinct events in the archive."""
    rows = store.client.query(
        f"SELECT uniqExact(event_id) FROM {store.db}.{ARCHIVE_TABLE}"
    ).result_rows
    return int(rows[0][0])


def archived_records(store: ClickHouseStore, page: int) -> Iterator[list[tuple[str, str, str]]]:
    """(stream_id, body, erased digest) of every archived event once, each stream in version
    order, page by page (keyset paging along the archive's sort key)."""
    after: tuple[str, str, int, str] | None = None
    while True:
        where, params = "1", dict[str, Any](limit=page)
        if after is not None:
            where = (
                "(tenant_id, stream_id, stream_version, event_id)"
                " > ({t:String}, {s:String}, {v:UInt64}, {e:String})"
            )
            params |= dict(zip(("t", "s", "v", "e"), after, strict=True))
        rows = store.client.query(
            f"SELECT tenant_id, stream_id, stream_version, event_id, body, erased_digest"
            f" FROM {store.db}.{ARCHIVE_TABLE} FINAL WHERE {where}"
            " ORDER BY tenant_id, stream_id, stream_version, event_id LIMIT {limit:UInt32}",
            parameters=params,
        ).result_rows
        if not rows:
            return
        yield [(str(r[1]), str(r[4]), str(r[5])) for r in rows]
        last = rows[-1]
        after = (str(last[0]), str(last[1]), int(last[2]), str(last[3]))
