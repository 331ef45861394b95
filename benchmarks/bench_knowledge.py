"""Embeddings, knowledge-base search and the reply cache, each against a brute-force
baseline measured in the same run.

- Embedding throughput: batches of 32 through MiniLM (int8 ONNX) vs one sentence at a time.
- Knowledge-base search over 100,000 passages (384-d, in chDB): the HNSW vector index vs
  the same query with the index off (an exact scan); recall@10 of the index is noted.
- Reply-cache lookup in a cache of 10,000 entries over 100 scopes: ours (the scope's
  vectors only, plus the exact-match dict) vs one matrix product over every entry.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from actors.cache import ReplyCache
from benchmarks.common import Result, best_rate, median_ms
from infra.adapters.clickhouse.knowledge import KB_COLUMNS, insert_passages, kb_search
from infra.adapters.clickhouse.migrations import KB_TABLE
from infra.adapters.clickhouse.store import ClickHouseStore
from infra.adapters.embeddings import MiniLMEmbedder
from infra.config import ClickHouseConfig

SENTENCES = [
    f"Question {i}: how do I {verb} my {thing} on the {place}?"
    for i, (verb, thing, place) in enumerate(
        (v, t, p)
        for v in ("reset", "change", "export", "delete", "share")
        for t in ("password", "invoice", "profile", "report", "team")
        for p in ("website", "mobile app", "desktop client", "admin console")
    )
]


def run(passages: int = 100_000, queries: int = 30) -> list[Result]:
    embedder = MiniLMEmbedder()
    embedder.embed(["warm up"])
    texts = SENTENCES[:96]

    def batched() -> int:
        embedder.embed(texts)
        return len(texts)

    def one_by_one() -> int:
        for text in texts:
            embedder.embed([text])
        return len(texts)

    results = [
        Result(
            "embedding throughput (MiniLM int8, batch 32)",
            "sentences/s",
            best_rate(batched),
            "one sentence per call",
            best_rate(one_by_one),
        )
    ]
    results += _kb_search(embedder, passages, queries)
    results.append(_cache_lookup(embedder))
    return results


def _kb_search(embedder: MiniLMEmbedder, passages: int, queries: int) -> list[Result]:
    with tempfile.TemporaryDirectory(prefix="chatllm-bench-kb-") as workdir:
        store = ClickHouseStore(ClickHouseConfig(path=str(Path(workdir) / "chdb"))).open()
        try:
            store.migrate()
            # Random unit vectors generated inside ClickHouse (search cost does not depend
            # on what the passages say), then real sentences among them.
            store.client.command(
                f"INSERT INTO {store.db}.{KB_TABLE} ({', '.join(KB_COLUMNS)})"
                " SELECT 'bench', 'synthetic', toString(number), '', 0, '', '',"
                " CAST(L2Normalize(arrayMap(i -> (rand(number * 384 + i) / 4294967295.0) - 0.5,"
                " range(384))) AS Array(Float32)) FROM numbers({n:UInt64})",
                parameters={"n": passages},
            )
            vectors = embedder.embed(SENTENCES)
            rows = [
                ("bench", "real", f"s{i}", "", 0, "", text, [float(x) for x in vector])
                for i, (text, vector) in enumerate(zip(SENTENCES, vectors, strict=True))
            ]
            insert_passages(store, rows)
            probes = [[float(x) for x in v] for v in embedder.embed(
                [f"how can I {s.split('do I ')[1]}" for s in SENTENCES[:queries]]
            )]  # fmt: skip
            indexed, exact, recall = [], [], []
            for probe in probes:
                started = time.perf_counter()
                found = kb_search(store, "bench", probe, 10, [])
                indexed.append(time.perf_counter() - started)
                started = time.perf_counter()
                truth = {
                    (r.source, r.document)
                    for r in kb_search(store, "bench", probe, 10, [], exact=True)
                }
                exact.append(time.perf_counter() - started)
                recall.append(len({(r.source, r.document) for r in found} & truth) / 10)
        finally:
            store.close()
    return [
        Result(
            f"kb search, {passages:,} passages, top 10 (HNSW index)",
            "ms",
            median_ms(indexed),
            "exact scan, index off",
            median_ms(exact),
            higher_is_better=False,
            note=f"recall@10 {np.mean(recall):.2f}",
        )
    ]


def _cache_lookup(embedder: MiniLMEmbedder, entries: int = 10_000, scopes: int = 100) -> Result:
    rng = np.random.default_rng(7)
    cache = ReplyCache(embedder, threshold=0.85, ttl_s=3600, max_entries=entries)
    all_vectors = rng.standard_normal((entries, embedder.dimension)).astype(np.float32)
    all_vectors /= np.linalg.norm(all_vectors, axis=1, keepdims=True)
    for i, vector in enumerate(all_vectors):
        cache.put(f"scope-{i % scopes}", f"prompt {i}", "reply", "m", f"id{i}", vector, 0.0)
    probes = [(f"scope-{i % scopes}", f"new prompt {i}", all_vectors[i]) for i in range(500)]
    for scope, prompt, vector in probes[:10]:
        cache.lookup(scope, prompt, vector, 1.0)  # stack each scope's matrix once
    ours, brute = [], []
    for scope, prompt, vector in probes:
        started = time.perf_counter()
        cache.lookup(scope, prompt, vector, 1.0)
        ours.append(time.perf_counter() - started)
        started = time.perf_counter()
        int(np.argmax(all_vectors @ vector))
        brute.append(time.perf_counter() - started)
    return Result(
        f"reply-cache lookup, {entries:,} entries / {scopes} scopes",
        "ms",
        median_ms(ours),
        "one product over every entry",
        median_ms(brute),
        higher_is_better=False,
        note="excludes embedding the message (see embedding throughput)",
    )
