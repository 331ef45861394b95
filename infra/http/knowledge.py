"""The knowledge base over HTTP: search it, ingest its sources (only what changed), and see
what it holds. Every route is scoped to the caller's tenant."""

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import msgspec
from fastapi import Depends, FastAPI, HTTPException, Query
from pydantic import BaseModel, Field

from infra.services.knowledge import KnowledgeBase, KnowledgeError


class IngestIn(BaseModel):
    source: str | None = Field(default=None, max_length=64, description="one source; none: all")


def add_knowledge_routes(
    api: FastAPI, caller: Callable[..., Awaitable[Any]], kb: KnowledgeBase
) -> None:
    Who = Annotated[Any, Depends(caller)]

    @api.get("/v1/kb/search", tags=["knowledge"])
    async def search(
        who: Who,
        q: Annotated[str, Query(min_length=1, max_length=10_000, description="the question")],
        k: Annotated[int, Query(ge=1, le=50)] = 3,
        source: Annotated[list[str] | None, Query(max_length=20)] = None,
    ) -> list[dict[str, Any]]:
        """The k passages closest to `q` in meaning, with their scores and sources."""
        found = await kb.search(who.tenant_id, q, k, source or ())
        return [msgspec.to_builtins(r) for r in found]

    @api.post("/v1/kb/ingest", tags=["knowledge"])
    async def ingest(body: IngestIn, who: Who) -> list[dict[str, Any]]:
        """Bring the knowledge base up to date with its sources: new and changed documents
        are embedded again, removed ones deleted, unchanged ones not read."""
        try:
            reports = await kb.ingest(body.source)
        except KnowledgeError as exc:
            raise HTTPException(422, str(exc)) from None
        return [vars(r) for r in reports]

    @api.get("/v1/kb", tags=["knowledge"])
    async def holdings(who: Who) -> dict[str, Any]:
        """The sources configured, and per source the documents and passages held."""
        held = {r["source"]: r for r in await kb.stats(who.tenant_id)}
        return {
            "sources": [
                {
                    "name": s.name,
                    "kind": s.kind,
                    "path": s.path,
                    "documents": held.get(s.name, {}).get("documents", 0),
                    "passages": held.get(s.name, {}).get("passages", 0),
                    "last_ingested": str(held[s.name]["last_ingested"]) if s.name in held else None,
                }
                for s in kb.config.sources
                if kb.tenant_of(s) == who.tenant_id
            ],
            "embedder": kb.embedder.name,
        }
