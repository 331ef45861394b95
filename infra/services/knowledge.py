"""The knowledge base: folders of documents and FAQ files, chunked, embedded, and kept in
ClickHouse (Array(Float32) with an HNSW vector index), searched by cosine distance.

Ingestion reads every file's digest and touches only what changed since the last one:
new and changed documents are parsed, embedded and replace their old passages; removed
ones are deleted. Each document's change is a KnowledgeIngested event in the log.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from actors.cache import Embedder
from actors.knowledge import (
    DOC_SUFFIXES,
    FAQ_SUFFIXES,
    FaqError,
    Passage,
    Retrieved,
    document_passages,
    faq_passages,
    plan,
)
from events import KnowledgeIngested
from events.standalone import standalone
from infra.adapters.clickhouse.knowledge import (
    kb_delete,
    kb_digests,
    kb_replace,
    kb_search,
    kb_stats,
)
from infra.adapters.clickhouse.store import AsyncStore
from infra.adapters.clock import SystemClock
from infra.config import KnowledgeConfig, KnowledgeSource

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
"""(source, documents done, documents to do)."""


class KnowledgeError(ValueError):
    """A knowledge source cannot be read; the message says which and why."""


@dataclass
class IngestReport:
    source: str
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: int = 0
    passages: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    """Documents that could not be read, with why (the others are still ingested)."""


def _read_folder(
    source: KnowledgeSource, suffixes: tuple[str, ...]
) -> tuple[dict[str, Path], dict[str, bytes]]:
    folder = Path(source.path)
    if not folder.is_dir():
        raise KnowledgeError(f"knowledge source {source.name!r}: {folder} is not a folder")
    files = {
        str(p.relative_to(folder)): p
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.suffix.lower() in suffixes
    }
    return files, {name: path.read_bytes() for name, path in files.items()}


def read_document(path: Path, data: bytes) -> str:
    """The text of a Markdown, text or PDF document."""
    if path.suffix.lower() == ".pdf":
        from pypdf import PdfReader
        from pypdf.errors import PdfReadError

        try:
            reader = PdfReader(io.BytesIO(data))
            return "\n\n".join(page.extract_text() or "" for page in reader.pages)
        except (PdfReadError, ValueError, KeyError) as exc:
            raise KnowledgeError(f"{path.name}: not a readable PDF: {exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KnowledgeError(f"{path.name}: not UTF-8 text: {exc}") from None


class KnowledgeBase:
    def __init__(
        self,
        store: AsyncStore,
        embedder: Embedder,
        config: KnowledgeConfig,
        *,
        default_tenant: str,
        record: Callable[[Any], Any] | None = None,
    ) -> None:
        """`record(event)` appends to the log (awaitable); None: not recorded (tests)."""
        self.store = store
        self.embedder = embedder
        self.config = config
        self.default_tenant = default_tenant
        self.record = record
        self._clock = SystemClock()
        self._lock = asyncio.Lock()

    def tenant_of(self, source: KnowledgeSource) -> str:
        return source.tenant or self.default_tenant

    # ---- ingestion ------------------------------------------------------------------

    async def ingest(
        self, only: str | None = None, progress: Progress | None = None
    ) -> list[IngestReport]:
        """Bring the knowledge base up to date with its sources (all, or the one named)."""
        sources = [s for s in self.config.sources if only is None or s.name == only]
        if only is not None and not sources:
            known = ", ".join(s.name for s in self.config.sources) or "none"
            raise KnowledgeError(f"no knowledge source {only!r} (sources: {known})")
        async with self._lock:  # one ingestion at a time: the plan reads what the last wrote
            return [await self._ingest(source, progress) for source in sources]

    async def _ingest(self, source: KnowledgeSource, progress: Progress | None) -> IngestReport:
        suffixes = FAQ_SUFFIXES if source.kind == "faq" else DOC_SUFFIXES
        files, contents = await asyncio.to_thread(_read_folder, source, suffixes)
        found = {name: hashlib.sha256(data).hexdigest() for name, data in contents.items()}
        tenant = self.tenant_of(source)
        current = await self.store.call_with(lambda s: kb_digests(s, tenant, source.name))
        changes = plan(current, found)
        report = IngestReport(source=source.name, unchanged=len(found) - len(
            [c for c in changes.values() if c != "removed"]))  # fmt: skip
        for done, (name, change) in enumerate(changes.items()):
            if progress is not None:
                progress(source.name, done, len(changes))
            if change == "removed":
                await self.store.call_with(
                    functools.partial(kb_delete, tenant=tenant, source=source.name, document=name)
                )
                await self._event(tenant, source.name, name, "removed", "", 0)
                report.removed.append(name)
                continue
            try:
                passages = self._passages(source, files[name], contents[name])
            except (KnowledgeError, FaqError) as exc:
                report.failed[name] = str(exc)
                log.warning("knowledge source %s: %s", source.name, exc)
                continue
            vectors = await asyncio.to_thread(self.embedder.embed, [p.match for p in passages])
            await self._event(tenant, source.name, name, change, found[name], len(passages))
            rows = [
                (
                    tenant,
                    source.name,
                    name,
                    found[name],
                    p.chunk,
                    p.title,
                    p.text,
                    list(map(float, v)),
                )
                for p, v in zip(passages, vectors, strict=True)
            ]
            await self.store.call_with(
                functools.partial(
                    kb_replace, tenant=tenant, source=source.name, document=name, rows=rows
                )
            )
            (report.added if change == "added" else report.updated).append(name)
            report.passages += len(passages)
        if progress is not None:
            progress(source.name, len(changes), len(changes))
        return report

    def _passages(self, source: KnowledgeSource, path: Path, data: bytes) -> list[Passage]:
        name = str(path.relative_to(source.path))
        if source.kind == "faq":
            return faq_passages(name, data)
        text = read_document(path, data)
        return document_passages(name, text, self.config.chunk_chars, self.config.chunk_overlap)

    async def _event(
        self, tenant: str, source: str, document: str, change: Any, digest: str, passages: int
    ) -> None:
        if self.record is None:
            return
        event = standalone(
            KnowledgeIngested(
                source=source, document=document, change=change, digest=digest,
                passages=passages, embedder=self.embedder.name,
            ),
            event_id=self._clock.new_event_id(),
            tenant_id=tenant,
            user_id="knowledge",
            occurred_at=datetime.now(UTC),
            stream="kb",
        )  # fmt: skip
        await self.record(event)

    # ---- search ---------------------------------------------------------------------

    async def search(
        self,
        tenant_id: str,
        query: str,
        k: int = 3,
        sources: Sequence[str] = (),
        min_score: float = -1.0,
    ) -> list[Retrieved]:
        """The k passages of the tenant's sources closest to `query` (cosine similarity)."""
        [vector] = await asyncio.to_thread(self.embedder.embed, [query])
        found = await self.store.call_with(
            lambda s: kb_search(s, tenant_id, [float(x) for x in vector], k, list(sources))
        )
        return [r for r in found if r.score >= min_score]

    async def stats(self, tenant_id: str) -> list[dict[str, Any]]:
        """Per source: documents, passages, last ingestion."""
        return await self.store.call_with(lambda s: kb_stats(s, tenant_id))
