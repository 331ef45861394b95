"""The read-side projectors: pure functions from events to rows, and their fold.

One event becomes at most one row, keyed by its event_id, in one of three tables:

- `facts`: one typed row per event of a chat turn (and feedback, tags, circuits),
  the base of conversation memory and analytics; the text of a message or reply
  is kept in `text` until the tenant's memory is pruned past it.
- `anomalies`: one row per AnomalyDetected.
- `memory_prunes`: one row per MemoryPruned.

The sinks are idempotent by event_id (ReplacingMergeTree), so replaying any part
of the log changes nothing. `fold` is the reference: what the tables must hold
after the projectors have seen `events`, whatever the crashes and redeliveries.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import datetime
from typing import Any, NamedTuple

from events import (
    AnomalyDetected,
    CircuitChanged,
    ContextCreated,
    Envelope,
    FeedbackGiven,
    InputChecked,
    MemoryPruned,
    MessageReceived,
    ModelCalled,
    RateLimitChecked,
    ReplyCompleted,
    ReplyFailed,
    RouteDecided,
    SentimentScored,
    TagsChanged,
    WorkflowFinished,
    WorkflowStarted,
    WorkflowStepCompleted,
    WorkflowStepFailed,
    WorkflowStepSkipped,
)

FACTS_TABLE = "facts"
ANOMALIES_TABLE = "anomalies"
PRUNES_TABLE = "memory_prunes"

MEMORY_TYPES = ("MessageReceived", "ReplyCompleted", "ReplyFailed", "SentimentScored")
"""The fact types a conversation-memory entry is made of (the ones pruning clears)."""


class FactRow(NamedTuple):
    event_id: str
    tenant_id: str
    at: datetime
    type: str
    context_id: str
    stream_version: int
    conversation_id: str
    """The turn: the correlation id shared by every event of one request."""
    user_id: str
    role: str = ""
    model: str = ""
    deployment: str = ""
    status: str = ""
    error_class: str = ""
    latency_ms: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tokens: int = 0
    sentiment: float = 0.0
    sentiment_label: str = ""
    rating: int = 0
    thumbs: str = ""
    fallback: int = 0
    topic: str = ""
    follow_up: str = ""
    text: str = ""
    tags_added: tuple[str, ...] = ()
    tags_removed: tuple[str, ...] = ()
    redacted: int = 0
    """1 once pruning cleared `text`; the sink keeps the row with the highest value."""
    workflow: str = ""
    step: str = ""
    """A workflow run's step (per-step metrics: status, latency_ms, error_class)."""


class AnomalyRow(NamedTuple):
    event_id: str
    tenant_id: str
    at: datetime
    detector: str
    metric: str
    subject: str
    observed: float
    threshold: float
    baseline: float
    window_s: float
    detail: str


class PruneRow(NamedTuple):
    event_id: str
    tenant_id: str
    at: datetime
    before: datetime
    max_age_days: float
    entries: int
    requested_by: str


FACT_COLUMNS: tuple[str, ...] = FactRow._fields
ANOMALY_COLUMNS: tuple[str, ...] = AnomalyRow._fields
PRUNE_COLUMNS: tuple[str, ...] = PruneRow._fields

Row = FactRow | AnomalyRow | PruneRow

# ---- classification of messages (deterministic, documented in docs/queries.md) ----------

_TOPICS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern, re.IGNORECASE))
    for name, pattern in (
        (
            "code",
            r"\b(code|python|function|bug|error|exception|compile|sql|regex|api|script)\b|```",
        ),
        (
            "math",
            r"\b(calculate|equation|integral|derivative|sum|solve|math|percent)\b|\d+\s*[-+*/^]\s*\d+",
        ),
        ("data", r"\b(data|dataset|table|csv|chart|query|statistics|average|metric)s?\b"),
        ("writing", r"\b(write|rewrite|essay|email|letter|summari[sz]e|translate|poem|story)\b"),
        ("support", r"\b(account|password|refund|order|billing|login|subscription|cancel)\b"),
        ("knowledge", r"\b(what|who|when|where|which)\b.*\?"),
    )
)

_FOLLOW_UPS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern, re.IGNORECASE))
    for name, pattern in (
        ("thanks", r"^\W*(thanks|thank you|thx|great|perfect)\b"),
        ("correction", r"\b(wrong|incorrect|not what|that's not|actually|no,)"),
        ("continuation", r"^\W*(continue|go on|next|and then|keep going)\b"),
        ("clarification", r"\b(what do you mean|why|explain|clarify|i don't understand)\b"),
        ("elaboration", r"\b(more|detail|details|example|examples|expand|elaborate)\b"),
    )
)


def topic_of(text: str) -> str:
    """The first topic whose keywords the text contains, else `general`."""
    for name, pattern in _TOPICS:
        if pattern.search(text):
            return name
    return "general"


def follow_up_kind(text: str) -> str:
    """What kind of follow-up a later user message in a conversation is."""
    for name, pattern in _FOLLOW_UPS:
        if pattern.search(text):
            return name
    return "new_question"


# ---- the projector --------------------------------------------------------------------


def _fact(event: Envelope[Any], **fields: Any) -> FactRow:
    return FactRow(
        event_id=event.event_id,
        tenant_id=event.tenant_id,
        at=event.occurred_at,
        type=event.type,
        context_id=event.stream_id,
        stream_version=event.stream_version,
        conversation_id=event.correlation_id,
        user_id=event.user_id,
        **fields,
    )


def project(event: Envelope[Any]) -> Row | None:
    """The row one event contributes to the read side, or None (it adds nothing)."""
    p = event.payload
    match p:
        case MessageReceived():
            fields: dict[str, Any] = {"role": p.role, "tokens": p.tokens, "text": p.content}
            if p.role == "user":
                # Classified as if it were a follow-up; queries skip each context's first
                # user message (which one is first is known only across events).
                fields["topic"] = topic_of(p.content)
                fields["follow_up"] = follow_up_kind(p.content)
            return _fact(event, **fields)
        case ReplyCompleted():
            return _fact(
                event,
                role="assistant",
                model=p.model,
                deployment=p.deployment,
                status="ok",
                latency_ms=p.latency_ms,
                prompt_tokens=p.prompt_tokens,
                completion_tokens=p.completion_tokens,
                fallback=int(p.fallback),
                text=p.content,
            )
        case ReplyFailed():
            return _fact(
                event, model=p.model, status="failed", error_class=p.error_class, text=p.message
            )
        case SentimentScored():
            return _fact(event, sentiment=p.score, sentiment_label=p.label)
        case RateLimitChecked():
            return _fact(event, status="allowed" if p.allowed else "denied", error_class=p.limit)
        case InputChecked():
            return _fact(event, status=p.verdict, error_class=",".join(p.reasons))
        case RouteDecided():
            return _fact(event, model=p.model, status=p.reason)
        case ModelCalled():
            return _fact(
                event,
                model=p.model,
                deployment=p.deployment,
                status=p.outcome,
                error_class="" if p.outcome == "ok" else p.outcome,
                latency_ms=p.latency_ms,
            )
        case CircuitChanged():
            return _fact(event, deployment=p.deployment, status=p.to_state.lower())
        case TagsChanged():
            return _fact(event, tags_added=p.added, tags_removed=p.removed)
        case FeedbackGiven():
            return _fact(
                event,
                rating=p.rating,
                thumbs=p.thumbs,
                text=p.reason,
                model=p.model,
                topic=p.topic,
            )
        case ContextCreated():
            return _fact(event, text=p.title)
        case WorkflowStarted():
            return _fact(event, workflow=p.workflow, status="started")
        case WorkflowStepCompleted():
            return _fact(event, workflow=p.workflow, step=p.step, status="completed",
                         latency_ms=p.duration_ms)  # fmt: skip
        case WorkflowStepFailed():
            return _fact(event, workflow=p.workflow, step=p.step, status="failed",
                         latency_ms=p.duration_ms, error_class=p.error_class,
                         text=p.message)  # fmt: skip
        case WorkflowStepSkipped():
            return _fact(event, workflow=p.workflow, step=p.step, status="skipped")
        case WorkflowFinished():
            return _fact(event, workflow=p.workflow, status=p.status, latency_ms=p.duration_ms,
                         text=p.error)  # fmt: skip
        case AnomalyDetected():
            return AnomalyRow(
                event_id=event.event_id,
                tenant_id=event.tenant_id,
                at=event.occurred_at,
                detector=p.detector,
                metric=p.metric,
                subject=p.subject,
                observed=p.observed,
                threshold=p.threshold,
                baseline=p.baseline,
                window_s=p.window_s,
                detail=p.detail,
            )
        case MemoryPruned():
            return PruneRow(
                event_id=event.event_id,
                tenant_id=event.tenant_id,
                at=event.occurred_at,
                before=p.before,
                max_age_days=p.max_age_days,
                entries=p.entries,
                requested_by=p.requested_by,
            )
    return None


def table_of(row: Row) -> str:
    if isinstance(row, FactRow):
        return FACTS_TABLE
    if isinstance(row, AnomalyRow):
        return ANOMALIES_TABLE
    return PRUNES_TABLE


def redact(row: FactRow) -> FactRow:
    """The row as pruning leaves it: the content gone, the numbers kept."""
    return row._replace(text="", redacted=1)


def is_pruned(row: FactRow, cutoff: datetime | None) -> bool:
    return cutoff is not None and row.type in MEMORY_TYPES and row.at < cutoff


def fold(events: Iterable[Envelope[Any]]) -> dict[str, dict[str, Row]]:
    """What each table holds after `events` (any order, any duplicates): rows by event_id,
    with the text of memory rows older than their tenant's latest prune cut off."""
    tables: dict[str, dict[str, Row]] = {FACTS_TABLE: {}, ANOMALIES_TABLE: {}, PRUNES_TABLE: {}}
    for event in events:
        row = project(event)
        if row is not None:
            tables[table_of(row)][row.event_id] = row
    cutoffs: dict[str, datetime] = {}
    for prune in tables[PRUNES_TABLE].values():
        assert isinstance(prune, PruneRow)
        if prune.tenant_id not in cutoffs or prune.before > cutoffs[prune.tenant_id]:
            cutoffs[prune.tenant_id] = prune.before
    facts = tables[FACTS_TABLE]
    for event_id, fact in facts.items():
        assert isinstance(fact, FactRow)
        if is_pruned(fact, cutoffs.get(fact.tenant_id)):
            facts[event_id] = redact(fact)
    return tables
