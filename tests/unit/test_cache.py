"""The reply cache's rules without the model (a word-hashing embedder stands in): scope,
exact and semantic hits, the polarity guard, TTL and bounds; and a turn answered from it."""

from __future__ import annotations

from actors.cache import ReplyCache, polarity, scope_key
from actors.ports import ChatMessage
from infra.adapters.embeddings import HashEmbedder
from tests.unit.test_chat_service import Harness, healthy


def cache(**kw: float) -> ReplyCache:
    options = {"threshold": 0.5, "ttl_s": 60.0, "max_entries": 100, **kw}
    return ReplyCache(HashEmbedder(), **options)  # type: ignore[arg-type]


def put(c: ReplyCache, scope: str, prompt: str, now: float = 0.0) -> None:
    c.put(scope, prompt, f"reply to {prompt}", "m", f"id-{prompt}", None, now)


def lookup(c: ReplyCache, scope: str, prompt: str, now: float = 1.0) -> str | None:
    hit = c.lookup(scope, prompt, c.vector(prompt), now)
    return None if hit is None else f"{hit.kind}:{hit.entry.prompt}"


def test_exact_and_semantic_hits_within_a_scope_only() -> None:
    c = cache()
    put(c, "s1", "How do I reset my password today")
    assert lookup(c, "s1", "how do I reset  my password TODAY") == (
        "exact:How do I reset my password today"
    )
    assert lookup(c, "s1", "how do I reset my password") == (
        "semantic:How do I reset my password today"
    )
    assert lookup(c, "s2", "How do I reset my password today") is None


def test_opposites_negations_and_numbers_never_hit_each_other() -> None:
    c = cache(threshold=0.0)
    put(c, "s", "enable dark mode")
    put(c, "s", "give me 5 ideas")
    put(c, "s", "can I get a refund")
    assert lookup(c, "s", "disable dark mode") is None
    assert lookup(c, "s", "give me 10 ideas") is None
    assert lookup(c, "s", "can I not get a refund") is None
    assert lookup(c, "s", "please enable dark mode") == "semantic:enable dark mode"
    assert polarity("turn it off") != polarity("turn it on")


def test_the_scope_holds_the_system_prompt_and_the_conversation() -> None:
    brief = [ChatMessage(role="system", content="be brief")]
    formal = [ChatMessage(role="system", content="be formal")]
    assert scope_key("t", brief, "") != scope_key("t", formal, "")
    assert scope_key("t", brief, "") != scope_key("t", brief, "gpt")
    assert scope_key("t", brief, "") != scope_key("u", brief, "")
    assert scope_key("t", brief, "") == scope_key("t", list(brief), "")


def test_entries_expire_and_the_cache_stays_bounded() -> None:
    c = cache(ttl_s=10.0, max_entries=3)
    put(c, "s", "first question here", now=0.0)
    assert lookup(c, "s", "first question here", now=5.0) is not None
    assert lookup(c, "s", "first question here", now=11.0) is None
    for n, scope in enumerate(["a", "b", "c", "d"]):
        put(c, scope, f"question {n}", now=20.0)
    assert len(c) == 3
    assert lookup(c, "a", "question 0", now=21.0) is None  # the least recently used went


async def test_a_repeated_question_is_answered_from_the_cache_and_recorded() -> None:
    h = Harness([healthy()])
    h.service.cache = cache()
    first = await h.ask("What are your opening hours on Sunday?", context="c1")
    again = await h.ask("What are your opening hours on Sunday?", context="c2")
    assert again.deployment == "cache" and again.reply == first.reply
    story = await h.story("c2")
    types = [t for t, _ in story]
    assert "RouteDecided" not in types and "ModelCalled" not in types
    hit = next(p for t, p in story if t == "CacheHit")
    assert hit.kind == "exact" and hit.similarity == 1.0
    assert hit.cached_message_id == first.message_id
    # A different system prompt is another scope: the model answers.
    other = await h.ask(
        "What are your opening hours on Sunday?",
        context="c3",
        history=[ChatMessage(role="system", content="answer in French")],
    )
    assert other.deployment != "cache"


async def test_failed_and_fallback_replies_are_never_cached() -> None:
    h = Harness([healthy(down=True)])
    h.service.cache = cache()
    first = await h.ask("Tell me a joke about queues", context="c1")
    assert first.fallback
    again = await h.ask("Tell me a joke about queues", context="c2")
    assert again.deployment != "cache"
    assert len(h.service.cache) == 0
