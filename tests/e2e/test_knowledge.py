"""The knowledge base and the reply cache in the running service: sources ingested from the
CLI, searched, attached to a reply (and the event saying which passages were used), and a
repeated question answered from the shared cache (and the event saying how similar)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.conftest import Service, cli, start_service, stop_service, wait_for
from tests.integration.test_knowledge import FAQ

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    workdir = tmp_path_factory.mktemp("kb")
    faq = workdir / "faq"
    faq.mkdir()
    (faq / "support.json").write_text(json.dumps([{"question": q, "answer": a} for q, a in FAQ]))
    config = f"""
[cache]
enabled = true
threshold = 0.85

[[kb.sources]]
name = "support"
path = "{faq}"
kind = "faq"
"""
    service = start_service(workdir, config=config)
    try:
        yield service
    finally:
        stop_service(service)


def ask(service: Service, context: str, text: str, **extra: object) -> dict[str, object]:
    response = httpx.post(
        f"{service.base}/v1/contexts/{context}/messages",
        json={"content": text, **extra},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    turn: dict[str, object] = response.json()
    return turn


def types(turn: dict[str, object]) -> list[str]:
    return [e["type"] for e in turn["events"]]  # type: ignore[attr-defined, index]


def test_ingest_search_and_a_reply_with_the_passages_it_used(running: Service) -> None:
    # Step 1: ingest from the CLI; a second run finds nothing to do.
    first = cli(running, "kb", "ingest")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "support" in first.stdout
    again = cli(running, "kb", "ingest", "--source", "support", "--format", "json")
    assert again.returncode == 0, again.stderr
    (report,) = [json.loads(line) for line in again.stdout.splitlines()]
    assert report["source"] == "support" and report["unchanged"] == 1  # nothing to do
    assert (report["added"], report["updated"], report["removed"]) == (0, 0, 0)

    # Step 2: a paraphrase finds its FAQ entry.
    found = cli(running, "kb", "search", "I want my money back", "-k", "1", "--format", "json")
    [best] = json.loads(found.stdout)
    assert best["title"] == "How can I get my money back?" and best["source"] == "support"

    # Step 3: a reply with the knowledge base attached records which passages it used.
    turn = ask(running, "kb-1", "I want my money back", knowledge=True)
    assert "KnowledgeUsed" in types(turn)

    def used() -> list[dict[str, object]]:
        found = cli(running, "audit", "search", "--action", "KnowledgeUsed", "--context", "kb-1",
                    "--format", "jsonl")  # fmt: skip
        return [json.loads(line) for line in found.stdout.splitlines() if line.strip()]

    logged = wait_for(used, "the KnowledgeUsed event in the archive")
    [passage, *_] = logged[0]["payload"]["passages"]
    assert (passage["source"], passage["document"]) == ("support", "support.json")

    # Step 4: the CLI shows what the knowledge base holds; a bad source is a clear error.
    listed = cli(running, "kb", "list")
    assert "support" in listed.stdout and "faq" in listed.stdout
    bad = cli(running, "kb", "ingest", "--source", "nope")
    assert bad.returncode == 1 and "no knowledge source 'nope'" in bad.stderr


def test_a_paraphrase_in_another_context_is_answered_from_the_shared_cache(
    running: Service,
) -> None:
    first = ask(running, "cache-1", "How do I change the email on my account?")
    assert "CacheHit" not in types(first) and "ModelCalled" in types(first)
    hit = ask(running, "cache-2", "How can I change the email of my account?")
    assert "CacheHit" in types(hit) and "ModelCalled" not in types(hit)
    assert hit["reply"] == first["reply"]
    # Its opposite is not a hit; nor is a caller who asks for no cache.
    assert "CacheHit" not in types(
        ask(running, "cache-3", "How do I not change the email on my account?")
    )
    assert "CacheHit" not in types(
        ask(running, "cache-4", "How do I change the email on my account?", cache=False)
    )


def test_feedback_from_the_cli_lands_in_the_quality_projection(running: Service) -> None:
    turn = ask(running, "fb-1", "Explain the refund rules in one line")
    done = cli(running, "feedback", "fb-1", str(turn["message_id"]), "--up", "--rating", "5",
               "--reason", "clear")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    refused = cli(running, "feedback", "fb-1", "no-such-reply", "--down")
    assert refused.returncode == 1 and "no reply 'no-such-reply'" in refused.stderr

    def quality() -> list[dict[str, object]]:
        shown = cli(running, "query", "quality", "--format", "json")
        rows = [json.loads(line) for line in shown.stdout.splitlines() if line.strip()]
        return [r for r in rows if r["model"] == turn["model"]]

    [row] = wait_for(quality, "the feedback in the quality projection")
    assert (row["feedback"], row["up"], row["avg_rating"], row["satisfied"]) == (1, 1, 5.0, 1.0)
    assert row["topic"]
