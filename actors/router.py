"""Model routing: a complexity score per query mapped to models by a routing table,
sticky conversations, weighted load balancing across a model's deployments,
fallback chains, and a circuit breaker (pybreaker) per deployment."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

import msgspec
import pybreaker

from actors.bandit import LearningPolicy, QualityBandit
from events import CircuitChanged, RouteDecided

ERROR_CLASSES = (
    "network",
    "timeout",
    "rate_limited",
    "malformed_response",
    "content_policy",
    "context_too_long",
    "bad_request",
)
# Errors that say something about the request, not the deployment: they never trip a breaker.
REQUEST_ERRORS = frozenset({"content_policy", "context_too_long", "bad_request"})

CAPABILITIES = ("tools", "json_mode", "logprobs", "n", "vision", "prefill")
"""What a deployment may declare it serves beyond plain text (Deployment.supports):
tool calls, JSON mode and structured outputs, log probabilities, n > 1 choices, image
input, and continuing an assistant message it is given last (what a cut stream's fallback
needs to carry on where the cut answer stopped)."""


class Deployment(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One place a model is served from."""

    name: str
    model: str
    provider: Literal["demo", "openai"] = "demo"
    base_url: str = ""
    """OpenAI-compatible base URL (…/v1) for provider "openai"."""
    api_key_env: str = ""
    """Environment variable holding the API key (keys never live in config files or events)."""
    upstream_model: str = ""
    """The model name the upstream expects; defaults to `model`."""
    weight: int = 1
    timeout_s: float = 60.0
    """Connecting, and a whole (non-streamed) answer, may take this long."""
    first_token_timeout_s: float = 30.0
    """A stream's first token may take this long from the request (time to first token)."""
    stall_timeout_s: float = 15.0
    """Once a stream has begun, the wait for each next piece may take this long."""
    context_window: int = 0
    """Tokens the model takes (prompt and answer); 0: not known. After a context_too_long
    error, the fallback chain skips models whose window is not larger."""
    extra_params: tuple[str, ...] = ()
    """Request parameters beyond OpenAI's that this upstream documents (vLLM's top_k, say):
    a request to this model may send them, and they are forwarded as sent."""
    supports: tuple[str, ...] | None = None
    """What it serves beyond plain text (CAPABILITIES); unset: the provider's default (demo:
    everything it can fake offline; openai: tools, json_mode, logprobs, n)."""
    latency_ms: float = 0.0
    """Demo provider: artificial latency."""
    faults: tuple[str, ...] = ()
    """Demo provider: error classes to raise on its first calls, in order (for tests and drills)."""
    down: bool = False
    """Demo provider: fail every call with a network error."""
    price_per_1k_tokens: float = 0.0
    """What 1,000 tokens (prompt + completion) cost here; `chatllm whatif` estimates with it."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.supports or ()) - set(CAPABILITIES))
        if unknown:
            raise ValueError(
                f"deployment {self.name!r}: unknown capabilities {unknown} "
                f"(known: {', '.join(CAPABILITIES)})"
            )

    @property
    def capabilities(self) -> frozenset[str]:
        if self.supports is not None:
            return frozenset(self.supports)
        if self.provider == "openai":
            return frozenset({"tools", "json_mode", "logprobs", "n"})
        return frozenset({"tools", "json_mode", "n", "prefill"})


class Band(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: str
    max_complexity: float
    model: str
    candidates: tuple[str, ...] = ()
    """Models routing may learn to prefer for this band from feedback (routing.learning);
    empty: always `model`."""


class RetryRule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    attempts: int = 1
    """Tries on this model (1 = no retry)."""
    then: Literal["fallback", "fail"] = "fallback"
    """After the last try: go down the fallback chain, or fail the request."""


def _default_retries() -> dict[str, RetryRule]:
    return {
        "network": RetryRule(attempts=3),
        "timeout": RetryRule(attempts=2),
        "rate_limited": RetryRule(attempts=3),
        "malformed_response": RetryRule(attempts=2),
        "content_policy": RetryRule(attempts=1, then="fail"),
        "context_too_long": RetryRule(attempts=1),
        "bad_request": RetryRule(attempts=1),
        "circuit_open": RetryRule(attempts=1),
    }


class RoutingPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The routing table and the recovery strategy per error class."""

    version: str = "1"
    bands: tuple[Band, ...] = (
        Band(name="simple", max_complexity=0.25, model="demo-fast"),
        Band(name="standard", max_complexity=0.6, model="demo-1"),
        Band(name="complex", max_complexity=1.0, model="demo-large"),
    )
    fallbacks: dict[str, list[str]] = msgspec.field(
        default_factory=lambda: {
            "demo-large": ["demo-1"],
            "demo-1": ["demo-fast"],
            "demo-fast": ["demo-1"],
        }
    )
    sticky: bool = True
    """A conversation stays on the model that answered it last, unless it is not in the table."""
    retries: dict[str, RetryRule] = msgspec.field(default_factory=_default_retries)
    backoff_base_s: float = 0.5
    """The first retry waits 0.25-0.5 s, each next one twice that (equal jitter)."""
    backoff_max_s: float = 4.0
    retry_after_cap_s: float = 10.0
    """Longest Retry-After the gateway honours by waiting; longer ones move to the fallback."""
    breaker_fail_max: int = 5
    breaker_reset_s: float = 30.0
    demo_fallback: bool = True
    """When every model of the chain failed, the offline demo model answers (flagged fallback)."""
    learning: LearningPolicy = msgspec.field(default_factory=LearningPolicy)


def default_deployments() -> list[Deployment]:
    return [
        # Illustrative prices, so what-if reports show a cost difference out of the box.
        Deployment(name="demo-fast-a", model="demo-fast", price_per_1k_tokens=0.1),
        Deployment(name="demo-1-a", model="demo-1", price_per_1k_tokens=0.5),
        Deployment(name="demo-1-b", model="demo-1", price_per_1k_tokens=0.5),
        Deployment(name="demo-large-a", model="demo-large", price_per_1k_tokens=2.0),
    ]


_CODE = re.compile(r"```|\bdef |\bclass |\bimport |[{};]\s*$|=>|\breturn\b", re.M)
_MATH = re.compile(
    r"\d+\s*[-+*/^=]\s*\d+|\b(integral|derivative|equation|solve|prove|sum of)\b", re.I
)
_ENUM = re.compile(r"^\s*(\d+[.)]|[-*•])\s+", re.M)


def complexity(text: str, depth: int) -> tuple[float, dict[str, float]]:
    """A 0..1 score from length, code, math, multi-part questions and conversation depth."""
    features = {
        "length": min(len(text) / 2000, 1.0),
        "code": min(len(_CODE.findall(text)) / 3, 1.0),
        "math": min(len(_MATH.findall(text)) / 3, 1.0),
        "multi_part": min((max(text.count("?") - 1, 0) + len(_ENUM.findall(text))) / 4, 1.0),
        "depth": min(depth / 20, 1.0),
    }
    weights = {"length": 0.3, "code": 0.3, "math": 0.2, "multi_part": 0.15, "depth": 0.05}
    score = sum(weights[k] * v for k, v in features.items())
    return round(min(score, 1.0), 4), {k: round(v, 4) for k, v in features.items()}


class _BreakerEvents(pybreaker.CircuitBreakerListener):
    def __init__(self, sink: list[CircuitChanged]) -> None:
        self._sink = sink

    def state_change(self, cb: pybreaker.CircuitBreaker, old_state: Any, new_state: Any) -> None:
        old = old_state.name if old_state is not None else "none"
        self._sink.append(
            CircuitChanged(deployment=cb.name or "", from_state=old, to_state=new_state.name)
        )


class ModelRouter:
    """Chooses models and deployments; keeps each deployment's circuit breaker."""

    def __init__(self, policy: RoutingPolicy, deployments: Sequence[Deployment]) -> None:
        self.policy = policy
        self.deployments = {d.name: d for d in deployments}
        self._by_model: dict[str, list[Deployment]] = {}
        for d in deployments:
            self._by_model.setdefault(d.model, []).append(d)
        self.circuit_events: list[CircuitChanged] = []
        listener = _BreakerEvents(self.circuit_events)
        self.breakers = {
            d.name: pybreaker.CircuitBreaker(
                fail_max=policy.breaker_fail_max,
                reset_timeout=policy.breaker_reset_s,
                exclude=[lambda e: getattr(e, "error_class", "") in REQUEST_ERRORS],
                listeners=[listener],
                name=d.name,
            )
            for d in deployments
        }
        self._turn: dict[str, int] = {}
        self.bandit = QualityBandit(policy.learning)
        missing = {b.model for b in policy.bands} - set(self._by_model)
        if missing:
            raise ValueError(f"routing table names models without deployments: {sorted(missing)}")

    @property
    def models(self) -> list[str]:
        return list(self._by_model)

    def route(
        self,
        *,
        in_reply_to: str,
        text: str,
        depth: int,
        current_model: str = "",
        requested: str = "",
        tenant_id: str = "",
        needs: frozenset[str] = frozenset(),
    ) -> RouteDecided:
        """The decision for one query, with its inputs (so a replay can recompute it).
        `needs`: capabilities the request uses; the chain holds only models with a
        deployment that serves them all (the caller refuses a request no model serves)."""
        score, features = complexity(text, depth)
        band = next(
            (b for b in self.policy.bands if score <= b.max_complexity), self.policy.bands[-1]
        )
        reason: Literal["table", "sticky", "requested"] = "table"
        model = band.model
        learned: tuple[dict[str, float], bool] | None = None
        if requested and requested in self._by_model:
            model, reason = requested, "requested"
        elif self.policy.sticky and current_model in self._by_model:
            model, reason = current_model, "sticky"
        else:
            candidates = [m for m in band.candidates if m in self._by_model]
            if self.policy.learning.enabled and candidates:
                model, scores, explored = self.bandit.choose(
                    tenant_id, band.name, candidates, seed=in_reply_to
                )
                learned = (scores, explored)
        chain = [model]
        for fallback in self.policy.fallbacks.get(model, []):
            if fallback not in chain and fallback in self._by_model:
                chain.append(fallback)
        if needs:
            chain = [m for m in chain if self.serves(m, needs)] or [
                m for m in self._by_model if self.serves(m, needs)
            ][:1]
            model = chain[0] if chain else model
        return RouteDecided(
            in_reply_to=in_reply_to,
            model=model,
            chain=tuple(chain),
            complexity=score,
            features=features,
            band=band.name,
            reason=reason,
            policy_version=self.policy.version,
            learned=learned is not None,
            scores=learned[0] if learned else {},
            explored=learned[1] if learned else False,
        )

    def serves(self, model: str, needs: frozenset[str]) -> bool:
        """Some deployment of `model` serves every capability in `needs`."""
        return any(needs <= d.capabilities for d in self._by_model.get(model, []))

    def window(self, model: str) -> int:
        """The largest context window among `model`'s deployments (0: not known)."""
        return max((d.context_window for d in self._by_model.get(model, [])), default=0)

    def pick(self, model: str, needs: frozenset[str] = frozenset()) -> Deployment | None:
        """The next deployment of `model` that serves `needs`, by weighted round robin,
        preferring closed circuits.

        When every circuit of the model is open, one is still returned: its breaker lets a
        trial call through once the reset timeout has passed, and refuses it otherwise.
        """
        deployments = [d for d in self._by_model.get(model, []) if needs <= d.capabilities]
        healthy = [
            d for d in deployments if self.breakers[d.name].current_state != pybreaker.STATE_OPEN
        ]
        pool = [d for d in (healthy or deployments) for _ in range(max(d.weight, 1))]
        if not pool:
            return None
        turn = self._turn.get(model, 0)
        self._turn[model] = turn + 1
        return pool[turn % len(pool)]

    def take_circuit_events(self) -> list[CircuitChanged]:
        taken = list(self.circuit_events)
        self.circuit_events.clear()
        return taken
