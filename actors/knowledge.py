"""The knowledge base's pure parts: documents into passages (chunks) and FAQ entries, what
a re-ingestion must touch, and how retrieved passages are put before the model."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Literal

import msgspec

DOC_SUFFIXES = (".md", ".markdown", ".txt", ".rst", ".pdf")
FAQ_SUFFIXES = (".json",)


class Passage(msgspec.Struct, frozen=True, kw_only=True):
    """A piece of a document: what is embedded (`match`) and what the model reads (`text`)."""

    document: str
    chunk: int
    title: str
    text: str
    match: str
    """What the embedding is made of: the text itself, or an FAQ entry's question and answer."""


class Retrieved(msgspec.Struct, frozen=True, kw_only=True):
    """A passage a search found, with its cosine similarity to the query."""

    source: str
    document: str
    chunk: int
    title: str
    text: str
    score: float


def chunk_text(text: str, max_chars: int = 800, overlap: int = 100) -> list[str]:
    """Paragraphs packed into chunks of at most `max_chars`; a longer paragraph is cut at
    sentence ends, and each cut chunk repeats the last `overlap` characters before it."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    chunks: list[str] = []
    current = ""
    for paragraph in paragraphs:
        pieces = [paragraph] if len(paragraph) <= max_chars else _cut(paragraph, max_chars, overlap)
        for piece in pieces:
            if current and len(current) + 2 + len(piece) > max_chars:
                chunks.append(current)
                current = ""
            current = f"{current}\n\n{piece}" if current else piece
    if current:
        chunks.append(current)
    return chunks


def _cut(paragraph: str, max_chars: int, overlap: int) -> list[str]:
    sentences = re.split(r"(?<=[.!?])\s+", paragraph)
    pieces: list[str] = []
    current = ""
    for sentence in sentences:
        while len(sentence) > max_chars:  # no sentence end in sight: a hard cut
            pieces.append(sentence[:max_chars])
            sentence = sentence[max_chars - overlap :]
        if current and len(current) + 1 + len(sentence) > max_chars:
            pieces.append(current)
            current = current[-overlap:] + " " + sentence if overlap else sentence
        else:
            current = f"{current} {sentence}" if current else sentence
    if current:
        pieces.append(current)
    return pieces


def document_passages(document: str, text: str, max_chars: int, overlap: int) -> list[Passage]:
    title = _title(text) or document
    return [
        Passage(document=document, chunk=i, title=title, text=chunk, match=chunk)
        for i, chunk in enumerate(chunk_text(text, max_chars, overlap))
    ]


def _title(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip().lstrip("#").strip()[:200]
    return ""


class FaqError(ValueError):
    """An FAQ file is not a list of {question, answer}; the message says where."""


def faq_passages(document: str, data: bytes) -> list[Passage]:
    """An FAQ file: a JSON list of {"question", "answer"} (or {"faq": [...]}); each entry is
    one passage, matched by its question and answer together."""
    try:
        parsed = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FaqError(f"{document}: not JSON: {exc}") from None
    entries = parsed.get("faq") if isinstance(parsed, Mapping) else parsed
    if not isinstance(entries, list):
        raise FaqError(f'{document}: expected a list of {{"question", "answer"}}')
    passages = []
    for i, entry in enumerate(entries):
        if not (
            isinstance(entry, Mapping)
            and isinstance(entry.get("question"), str)
            and isinstance(entry.get("answer"), str)
        ):
            raise FaqError(f"{document}: entry {i} needs a question and an answer (strings)")
        question, answer = entry["question"].strip(), entry["answer"].strip()
        passages.append(
            Passage(
                document=document,
                chunk=i,
                title=question,
                text=f"Q: {question}\nA: {answer}",
                match=f"{question} {answer}",
            )
        )
    return passages


Change = Literal["added", "updated", "removed"]


def plan(current: Mapping[str, str], found: Mapping[str, str]) -> dict[str, Change]:
    """What a re-ingestion touches: documents (name -> digest) new, changed or gone since
    the last one. An unchanged document is not read again."""
    changes: dict[str, Change] = {}
    for name, digest in found.items():
        if name not in current:
            changes[name] = "added"
        elif current[name] != digest:
            changes[name] = "updated"
    for name in current:
        if name not in found:
            changes[name] = "removed"
    return dict(sorted(changes.items()))


def knowledge_prompt(passages: Sequence[Retrieved]) -> str:
    """The system message that puts retrieved passages before the model."""
    lines = ["Use these passages from the knowledge base where they help; cite [n]."]
    for n, p in enumerate(passages, start=1):
        lines.append(f"[{n}] {p.source}/{p.document}: {p.text}")
    return "\n\n".join(lines)
