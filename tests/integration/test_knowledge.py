"""The knowledge base and the reply cache with the real model (all-MiniLM-L6-v2, offline)
and real ClickHouse: paraphrased questions find their FAQ entry; re-ingestion touches only
what changed; the cache hits paraphrases and misses opposites and other system prompts."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from actors.cache import ReplyCache
from actors.ports import ChatMessage
from infra.adapters.clickhouse.store import AsyncStore, ClickHouseStore
from infra.adapters.embeddings import MiniLMEmbedder
from infra.config import KnowledgeConfig, KnowledgeSource
from infra.services.knowledge import KnowledgeBase
from tests.unit.test_chat_service import Harness, healthy

pytestmark = pytest.mark.integration

FAQ = [
    ("How can I get my money back?", "Refunds are paid within 30 days of purchase."),
    ("How do I reset my password?", "Use 'Forgot password' on the sign-in page."),
    ("How long does shipping take?", "Parcels arrive in 3 to 5 working days."),
    ("How do I cancel my subscription?", "Cancel any time under Account > Billing."),
    ("Can I change the email address of my account?", "Yes, under Account > Profile."),
    ("When is your support team available?", "Support answers Monday to Friday, 9 to 17."),
    ("Where do I find my invoices?", "Invoices are under Account > Billing > Invoices."),
    ("How do I delete my account?", "Write to privacy@example.com; we erase it in 30 days."),
]
PARAPHRASES = {
    "I want a refund for my order": "How can I get my money back?",
    "I forgot my login password": "How do I reset my password?",
    "when will my package be delivered": "How long does shipping take?",
    "stop my plan, I don't want to pay anymore": "How do I cancel my subscription?",
    "what hours can I reach customer service": "When is your support team available?",
    "download a bill for my purchase": "Where do I find my invoices?",
}


@pytest.fixture(scope="module")
def embedder() -> MiniLMEmbedder:
    return MiniLMEmbedder()


@pytest.fixture
async def kb(
    store: ClickHouseStore, tmp_path: Path, embedder: MiniLMEmbedder
) -> AsyncIterator[tuple[KnowledgeBase, list[Any], Path]]:
    faq, docs = tmp_path / "faq", tmp_path / "docs"
    faq.mkdir()
    docs.mkdir()
    entries = [{"question": q, "answer": a} for q, a in FAQ]
    (faq / "support.json").write_text(json.dumps(entries))
    (docs / "lisbon.md").write_text("# Lisbon\n\nTrams climb the hills of Alfama.\n")
    (docs / "rome.txt").write_text("Rome\n\nThe Colosseum held fifty thousand people.\n")
    (docs / "tokyo.pdf").write_bytes(pdf("Tokyo has the busiest railway station on earth."))
    config = KnowledgeConfig(
        sources=[
            KnowledgeSource(name="faq", path=str(faq), kind="faq"),
            KnowledgeSource(name="guides", path=str(docs)),
        ]
    )
    events: list[Any] = []

    async def record(event: Any) -> None:
        events.append(event.payload)

    astore = AsyncStore(store)
    try:
        yield (
            KnowledgeBase(astore, embedder, config, default_tenant="acme", record=record),
            events,
            tmp_path,
        )
    finally:
        astore.close()


async def test_paraphrased_questions_find_their_faq_entry(
    kb: tuple[KnowledgeBase, list[Any], Path],
) -> None:
    base, _, _ = kb
    [report] = await base.ingest("faq")
    assert len(report.added) == 1 and report.passages == len(FAQ)
    for question, expected in PARAPHRASES.items():
        [best, *_] = await base.search("acme", question, k=3, sources=["faq"])
        assert best.title == expected, f"{question!r} found {best.title!r} ({best.score})"
        assert best.text.startswith(f"Q: {expected}\nA: ")
    # Another tenant sees none of it.
    assert await base.search("other", "refund", k=3) == []


async def test_documents_of_every_kind_are_found_and_reingestion_touches_only_changes(
    kb: tuple[KnowledgeBase, list[Any], Path],
) -> None:
    base, events, root = kb
    # Step 1: Markdown, text and PDF documents are ingested, one event each.
    [report] = await base.ingest("guides")
    assert sorted(report.added) == ["lisbon.md", "rome.txt", "tokyo.pdf"], report.failed
    assert [(e.document, e.change) for e in events] == [
        ("lisbon.md", "added"), ("rome.txt", "added"), ("tokyo.pdf", "added"),
    ]  # fmt: skip
    [hit] = await base.search("acme", "which city has a huge train station?", k=1)
    assert hit.document == "tokyo.pdf" and "railway" in hit.text
    [hit] = await base.search("acme", "ancient arena for gladiators", k=1)
    assert hit.document == "rome.txt"

    # Step 2: nothing changed: nothing is read again, no event.
    events.clear()
    [report] = await base.ingest("guides")
    assert (report.added, report.updated, report.removed, report.unchanged) == ([], [], [], 3)
    assert events == []

    # Step 3: one edited, one removed: only those are touched.
    (root / "docs" / "lisbon.md").write_text("# Lisbon\n\nPastel de nata is a custard tart.\n")
    (root / "docs" / "rome.txt").unlink()
    [report] = await base.ingest("guides")
    assert (report.updated, report.removed, report.unchanged) == (["lisbon.md"], ["rome.txt"], 1)
    assert [(e.document, e.change) for e in events] == [
        ("lisbon.md", "updated"), ("rome.txt", "removed"),
    ]  # fmt: skip
    [hit] = await base.search("acme", "a Portuguese pastry", k=1)
    assert "custard" in hit.text
    assert all(r.document != "rome.txt" for r in await base.search("acme", "Colosseum", k=5))
    [stats] = await base.stats("acme")
    assert (stats["source"], stats["documents"]) == ("guides", 2)


async def test_the_cache_hits_paraphrases_but_not_opposites_or_other_system_prompts(
    embedder: MiniLMEmbedder,
) -> None:
    h = Harness([healthy()])
    h.service.cache = ReplyCache(embedder, threshold=0.85, ttl_s=600, max_entries=1000)
    contexts = iter(f"c{n}" for n in range(100))

    async def ask(text: str, system: str = "") -> Any:
        history = [ChatMessage(role="system", content=system)] if system else []
        return await h.ask(text, context=next(contexts), history=history)

    for question in (
        "How do I reset my password?",
        "How do I enable dark mode?",
        "How do I turn on notifications?",
        "How do I add a user to my team?",
    ):
        assert (await ask(question)).deployment != "cache"

    paraphrase = await ask("How can I reset my password?")
    assert paraphrase.deployment == "cache"
    for opposite in (
        "How do I disable dark mode?",
        "How do I turn off notifications?",
        "How do I remove a user from my team?",
        "How do I not reset my password?",
    ):
        assert (await ask(opposite)).deployment != "cache", opposite
    # The same question under another system prompt is another scope.
    assert (await ask("How do I reset my password?", system="Answer in French")).deployment != (
        "cache"
    )
    hits = [p for c in ("c4",) for t, p in await h.story(c) if t == "CacheHit"]
    assert hits and hits[0].kind == "semantic" and 0.85 <= hits[0].similarity < 1.0


def pdf(text: str) -> bytes:
    """A one-page PDF showing `text` (offsets computed, so any reader accepts it)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R"
        b" /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)
