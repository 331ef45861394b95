"""Sentiment with VADER, a lexicon scorer: fast, offline, no model weights."""

from __future__ import annotations

from typing import Any


class VaderScorer:
    """VADER's compound score (-1..1) of a text."""

    name = "vader-3.3.2"

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer: Any = SentimentIntensityAnalyzer()

    def score(self, text: str) -> float:
        return float(self._analyzer.polarity_scores(text)["compound"])
