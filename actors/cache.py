"""The reply cache: exact and semantic, per tenant and conversation scope, with a TTL.

Lessons from semantic caches in other gateways, built in:
- The key is the whole scope, not the last message: the system prompt, the conversation
  before the message, and the model asked for. The same question in another scope misses.
- Opposites embed close together ("enable X" / "disable X" score 0.94 with MiniLM, above a
  true paraphrase at 0.89), so a semantic hit also needs the same polarity signature:
  the same opposition words on the same side, the same parity of negations, the same
  numbers.
- Only complete, model-made replies are cached: never failures, never fallbacks.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from actors.ports import ChatMessage

# Each word names a concept and a side: "disable" is enable's negative side. Bare "no",
# "not", "without" count as negations instead.
_OPPOSITES = [
    ("enable", "disable"), ("allow", "deny"), ("allow", "block"),
    ("add", "remove"), ("add", "delete"), ("start", "stop"), ("increase", "decrease"),
    ("show", "hide"), ("lock", "unlock"), ("open", "close"), ("include", "exclude"),
    ("accept", "reject"), ("activate", "deactivate"), ("subscribe", "unsubscribe"),
    ("buy", "sell"), ("before", "after"), ("max", "min"),
    ("maximum", "minimum"), ("more", "less"), ("enabled", "disabled"), ("connect", "disconnect"),
    ("install", "uninstall"), ("encrypt", "decrypt"), ("import", "export"), ("upload", "download"),
    ("true", "false"), ("always", "never"),
    ("win", "lose"), ("mute", "unmute"), ("follow", "unfollow"), ("pause", "resume"),
]  # fmt: skip
_POLARITY: dict[str, tuple[str, int]] = {}
for _plus, _minus in _OPPOSITES:
    _POLARITY.setdefault(_plus, (_plus, 1))
    _POLARITY.setdefault(_minus, (_plus, -1))
# "on", "up", "with" are mostly prepositions ("the email on my account"): only their
# opposites count, so "turn off" differs from "turn on" and the preposition changes nothing.
_POLARITY.update({"off": ("on", -1), "down": ("up", -1)})
_NEGATIONS = frozenset({"not", "no", "never", "cannot", "without", "nor", "none", "nothing"})
_TOKEN = re.compile(r"[a-z]+(?:'t)?|\d+(?:\.\d+)?")


def polarity(text: str) -> tuple[frozenset[tuple[str, int]], int, frozenset[str]]:
    """(opposition words as (concept, side), parity of negations, numbers) of a text."""
    words = _TOKEN.findall(text.lower())
    sides = frozenset(_POLARITY[w] for w in words if w in _POLARITY)
    negations = sum(1 for w in words if w in _NEGATIONS or w.endswith("n't")) % 2
    numbers = frozenset(w for w in words if w[0].isdigit())
    return sides, negations, numbers


def scope_key(tenant_id: str, history: Sequence[ChatMessage], model: str) -> str:
    """The scope a reply is valid in: tenant, the model asked for, and every message before
    the new one (the system prompt among them)."""
    material = json.dumps([tenant_id, model, [[m.role, m.content] for m in history]])
    return hashlib.sha256(material.encode()).hexdigest()


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


class Embedder(Protocol):
    name: str
    dimension: int

    def embed(self, texts: Sequence[str]) -> Any:
        """A float32 matrix: one unit-length row per text."""
        ...


@dataclass
class Entry:
    prompt: str
    reply: str
    model: str
    message_id: str
    """The ReplyCompleted this entry reuses."""
    vector: np.ndarray
    signature: tuple[frozenset[tuple[str, int]], int, frozenset[str]]
    expires_at: float


@dataclass(frozen=True)
class Hit:
    kind: Literal["exact", "semantic"]
    similarity: float
    entry: Entry


@dataclass
class _Scope:
    exact: dict[str, Entry] = field(default_factory=dict)
    entries: list[Entry] = field(default_factory=list)
    matrix: np.ndarray | None = None
    """The entries' vectors stacked (rebuilt lazily after a change)."""


class ReplyCache:
    """One shard's reply cache (a tenant lives on exactly one shard, so every gateway
    replica shares it). Bounded: at most `max_entries`, the least recently used scope
    goes first; entries expire after `ttl_s`."""

    def __init__(
        self, embedder: Embedder, *, threshold: float, ttl_s: float, max_entries: int
    ) -> None:
        self.embedder = embedder
        self.threshold = threshold
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._scopes: OrderedDict[str, _Scope] = OrderedDict()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def clear(self) -> None:
        """Forget every entry (a user's content was erased: no reply may come back)."""
        self._scopes.clear()
        self._size = 0

    def vector(self, text: str) -> np.ndarray:
        row: np.ndarray = self.embedder.embed([text])[0]
        return row

    def lookup(self, scope: str, prompt: str, vector: np.ndarray | None, now: float) -> Hit | None:
        """An exact hit, or the most similar entry of the scope at or above the threshold
        with the prompt's polarity; None otherwise. `vector` None: exact matching only."""
        bucket = self._scopes.get(scope)
        if bucket is None:
            return None
        self._scopes.move_to_end(scope)
        self._expire(bucket, now)
        exact = bucket.exact.get(normalise(prompt))
        if exact is not None:
            return Hit("exact", 1.0, exact)
        if vector is None or not bucket.entries:
            return None
        if bucket.matrix is None:
            bucket.matrix = np.vstack([e.vector for e in bucket.entries])
        scores = bucket.matrix @ vector
        signature = polarity(prompt)
        for index in np.argsort(-scores):
            score = float(scores[index])
            if score < self.threshold:
                break
            entry = bucket.entries[index]
            if entry.signature == signature:
                return Hit("semantic", round(score, 4), entry)
        return None

    def put(
        self,
        scope: str,
        prompt: str,
        reply: str,
        model: str,
        message_id: str,
        vector: np.ndarray | None,
        now: float,
    ) -> None:
        bucket = self._scopes.setdefault(scope, _Scope())
        self._scopes.move_to_end(scope)
        key = normalise(prompt)
        if key in bucket.exact:
            return
        entry = Entry(
            prompt=prompt,
            reply=reply,
            model=model,
            message_id=message_id,
            vector=vector if vector is not None else self.vector(prompt),
            signature=polarity(prompt),
            expires_at=now + self.ttl_s,
        )
        bucket.exact[key] = entry
        bucket.entries.append(entry)
        bucket.matrix = None
        self._size += 1
        while self._size > self.max_entries:
            if len(self._scopes) > 1:  # the least recently used scope goes first
                _, oldest = self._scopes.popitem(last=False)
                self._size -= len(oldest.entries)
            else:  # one scope alone: its oldest entry
                gone = bucket.entries.pop(0)
                bucket.exact.pop(normalise(gone.prompt), None)
                bucket.matrix = None
                self._size -= 1

    def _expire(self, bucket: _Scope, now: float) -> None:
        live = [e for e in bucket.entries if e.expires_at > now]
        if len(live) != len(bucket.entries):
            self._size -= len(bucket.entries) - len(live)
            bucket.entries = live
            bucket.exact = {normalise(e.prompt): e for e in live}
            bucket.matrix = None
