"""The knowledge base's table: the passages of each document (digest, chunks, embeddings),
searched by cosine distance under the HNSW index. Blocking; the knowledge service runs these
through AsyncStore."""

from __future__ import annotations

from typing import Any

from actors.knowledge import Retrieved
from infra.adapters.clickhouse.migrations import KB_TABLE
from infra.adapters.clickhouse.reads import utc_aware
from infra.adapters.clickhouse.store import ClickHouseStore


def kb_digests(store: ClickHouseStore, tenant: str, source: str) -> dict[str, str]:
    rows = store.client.query(
        f"SELECT document, any(digest) FROM {store.db}.{KB_TABLE}"
        " WHERE tenant_id = {tenant:String} AND source = {source:String} GROUP BY document",
        parameters={"tenant": tenant, "source": source},
    ).result_rows
    return {document: digest for document, digest in rows}


def kb_delete(store: ClickHouseStore, tenant: str, source: str, document: str) -> None:
    store.client.command(
        f"DELETE FROM {store.db}.{KB_TABLE} WHERE tenant_id = {{tenant:String}}"
        " AND source = {source:String} AND document = {document:String}",
        parameters={"tenant": tenant, "source": source, "document": document},
    )


def kb_replace(
    store: ClickHouseStore, tenant: str, source: str, document: str, rows: list[tuple[Any, ...]]
) -> None:
    kb_delete(store, tenant, source, document)
    insert_passages(store, rows)


KB_COLUMNS = ("tenant_id", "source", "document", "digest", "chunk", "title", "text", "embedding")
"""The columns a passage row gives, in order (ingested_at is the insert's time)."""


def insert_passages(store: ClickHouseStore, rows: list[tuple[Any, ...]]) -> None:
    if rows:
        store.client.insert(KB_TABLE, rows, column_names=list(KB_COLUMNS), database=store.db)


def kb_search(
    store: ClickHouseStore,
    tenant: str,
    vector: list[float],
    k: int,
    sources: list[str],
    exact: bool = False,
) -> list[Retrieved]:
    """The k nearest passages; `exact` scans every one instead of using the HNSW index."""
    where = " AND source IN {sources:Array(String)}" if sources else ""
    settings = " SETTINGS use_skip_indexes = 0" if exact else ""
    rows = store.client.query(
        "SELECT source, document, chunk, title, text,"
        " 1 - cosineDistance(embedding, {vector:Array(Float32)}) AS score"
        f" FROM {store.db}.{KB_TABLE} WHERE tenant_id = {{tenant:String}}{where}"
        " ORDER BY cosineDistance(embedding, {vector:Array(Float32)}) LIMIT {k:UInt32}"
        f"{settings}",
        parameters={"tenant": tenant, "vector": vector, "k": k, "sources": sources},
    ).result_rows
    return [
        Retrieved(source=s, document=d, chunk=c, title=t, text=x, score=round(float(score), 4))
        for s, d, c, t, x, score in rows
    ]


def kb_stats(store: ClickHouseStore, tenant: str) -> list[dict[str, Any]]:
    result = store.client.query(
        "SELECT source, uniqExact(document) AS documents, count() AS passages,"
        " max(ingested_at) AS last_ingested"
        f" FROM {store.db}.{KB_TABLE} WHERE tenant_id = {{tenant:String}}"
        " GROUP BY source ORDER BY source",
        parameters={"tenant": tenant},
    )
    return [
        {n: utc_aware(v) for n, v in zip(result.column_names, row, strict=True)}
        for row in result.result_rows
    ]
