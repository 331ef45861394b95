"""Input handling: length limits, control characters, block patterns, injection heuristics."""

from __future__ import annotations

import re
import unicodedata

import msgspec

_INJECTION = (
    r"ignore (all |any )?(previous|prior|above) (instructions|prompts|messages)",
    r"disregard (the |your )?(system|previous) (prompt|instructions)",
    r"you are now (in )?(developer|dan|jailbreak) mode",
    r"reveal (your|the) (system prompt|hidden instructions)",
    r"pretend (that )?you have no (rules|restrictions|guidelines)",
)


class SanitizerPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    version: str = "1"
    max_chars: int = 32_000
    block_patterns: tuple[str, ...] = ()
    """Regular expressions (case-insensitive) that block a message outright."""
    block_injection: bool = False
    """Block messages that look like prompt injection (otherwise they are only flagged)."""


class Verdict(msgspec.Struct, frozen=True, kw_only=True):
    allowed: bool
    reasons: tuple[str, ...]
    text: str
    """The message as it will be used: control characters removed, Unicode normalized."""


class Sanitizer:
    """Checks one incoming message and cleans what can be cleaned."""

    def __init__(self, policy: SanitizerPolicy) -> None:
        self.policy = policy
        self._blocks = [re.compile(p, re.I) for p in policy.block_patterns]
        self._injection = [re.compile(p, re.I) for p in _INJECTION]

    def check(self, text: str) -> Verdict:
        reasons: list[str] = []
        allowed = True
        cleaned = unicodedata.normalize("NFC", text)
        stripped = "".join(
            ch
            for ch in cleaned
            if ch in "\n\t" or unicodedata.category(ch) not in ("Cc", "Cf", "Cs")
        )
        if stripped != cleaned:
            reasons.append("control characters removed")
        if len(stripped) > self.policy.max_chars:
            allowed = False
            reasons.append(f"too long: {len(stripped)} > {self.policy.max_chars} characters")
        if not stripped.strip():
            allowed = False
            reasons.append("empty message")
        for pattern in self._blocks:
            if pattern.search(stripped):
                allowed = False
                reasons.append(f"blocked pattern: {pattern.pattern}")
        for pattern in self._injection:
            if pattern.search(stripped):
                reasons.append("possible prompt injection")
                if self.policy.block_injection:
                    allowed = False
                break
        return Verdict(allowed=allowed, reasons=tuple(reasons), text=stripped)
