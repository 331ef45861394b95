"""Routing that learns from feedback: Thompson sampling over the models a complexity band
allows, with exploration bounded by config.

Each (tenant, band, model) keeps a Beta posterior of "the user was satisfied": a thumbs
up or a rating of 4-5 counts 1, a thumbs down or 1-2 counts 0, a 3 counts half. The state
is a fold of FeedbackGiven events alone, so a restarted shard rebuilds it from the log and
`chatllm whatif` replays it. Choices are seeded by the message id: the same events give
the same choices.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Annotated

import msgspec

from events import FeedbackGiven


class LearningPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    enabled: bool = False
    """Learn which of a band's `candidates` users are happiest with."""
    max_explore: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.2
    """At most this share of a band's requests explores (a Thompson sample); the rest go to
    the model with the best posterior mean."""
    prior_alpha: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    prior_beta: Annotated[float, msgspec.Meta(gt=0)] = 1.0


def reward(feedback: FeedbackGiven) -> float | None:
    """1 satisfied, 0 not, 0.5 indifferent; None if the feedback says neither."""
    if feedback.rating:
        return 1.0 if feedback.rating >= 4 else 0.0 if feedback.rating <= 2 else 0.5
    if feedback.thumbs:
        return 1.0 if feedback.thumbs == "up" else 0.0
    return None


class QualityBandit:
    def __init__(self, policy: LearningPolicy) -> None:
        self.policy = policy
        self.counts: dict[tuple[str, str, str], tuple[float, float]] = {}
        """(tenant, band, model) -> (successes, failures) observed."""

    def learn(self, tenant_id: str, feedback: FeedbackGiven) -> None:
        r = reward(feedback)
        if r is None or not feedback.model or not feedback.band:
            return
        key = (tenant_id, feedback.band, feedback.model)
        wins, losses = self.counts.get(key, (0.0, 0.0))
        self.counts[key] = (wins + r, losses + 1 - r)

    def posterior(self, tenant_id: str, band: str, model: str) -> tuple[float, float]:
        wins, losses = self.counts.get((tenant_id, band, model), (0.0, 0.0))
        return self.policy.prior_alpha + wins, self.policy.prior_beta + losses

    def choose(
        self, tenant_id: str, band: str, candidates: Sequence[str], seed: str
    ) -> tuple[str, dict[str, float], bool]:
        """(model, the scores it was chosen by, whether it explored)."""
        rng = random.Random(seed)
        means = {}
        for model in candidates:
            a, b = self.posterior(tenant_id, band, model)
            means[model] = round(a / (a + b), 4)
        greedy = max(candidates, key=lambda m: means[m])  # the first on ties
        if rng.random() >= self.policy.max_explore:
            return greedy, means, False
        samples = {
            m: round(rng.betavariate(*self.posterior(tenant_id, band, m)), 4) for m in candidates
        }
        pick = max(candidates, key=lambda m: samples[m])
        return pick, samples, True
