"""The payloads of a chat turn: frozen msgspec Structs with past-tense names.

Schemas only grow: a new field gets a default, a field never changes type, and a
breaking change is a new type plus an upcaster (see events/upcasters.py).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]


class ContextCreated(msgspec.Struct, frozen=True, kw_only=True):
    """A conversation context came into being; the first event of its stream."""

    title: str = ""


class ToolCall(msgspec.Struct, frozen=True, kw_only=True):
    """A function call a model asked for (OpenAI's tool_calls entry): the caller runs it
    and sends its result back as a `tool` message with the same id."""

    id: NonEmpty
    name: NonEmpty
    arguments: str = "{}"
    """The arguments as the model wrote them: JSON text, not checked against the schema."""


class MessageReceived(msgspec.Struct, frozen=True, kw_only=True):
    """A message entered the context: the user's, a tool's result, a system prompt, or
    earlier history a stateless (OpenAI-style) request carried along."""

    message_id: NonEmpty
    content: str
    role: Literal["user", "system", "assistant", "tool"] = "user"
    tokens: Annotated[int, msgspec.Meta(ge=0)] = 0
    tool_call_id: str = ""
    """A tool's result: the id of the call it answers."""
    tool_calls: tuple[ToolCall, ...] = ()
    """Earlier history: the calls an assistant message asked for."""


class ReplyCompleted(msgspec.Struct, frozen=True, kw_only=True):
    """The model answered a message."""

    message_id: NonEmpty
    in_reply_to: NonEmpty
    content: str
    model: NonEmpty
    latency_ms: Annotated[float, msgspec.Meta(ge=0)]
    prompt_tokens: Annotated[int, msgspec.Meta(ge=0)] = 0
    completion_tokens: Annotated[int, msgspec.Meta(ge=0)] = 0
    finish_reason: str = "stop"
    deployment: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    """The function calls the model asked for (finish_reason "tool_calls")."""
    fallback: bool = False
    """Answered by a fallback: a later model of the chain, or (every routed model failed) the
    offline demo model."""


class ReplyFailed(msgspec.Struct, frozen=True, kw_only=True):
    """The model could not answer a message; the error is classified, not swallowed."""

    in_reply_to: NonEmpty
    error_class: NonEmpty
    message: str
    model: str = ""


class InputChecked(msgspec.Struct, frozen=True, kw_only=True):
    """The sanitizer's verdict on an incoming message (recorded whether it passed or not)."""

    message_id: NonEmpty
    verdict: Literal["allow", "block"]
    reasons: tuple[str, ...] = ()
    length: Annotated[int, msgspec.Meta(ge=0)] = 0
    policy_version: str = ""


class SentimentScored(msgspec.Struct, frozen=True, kw_only=True):
    """The sentiment of a message: a label and a compound score in -1..1."""

    message_id: NonEmpty
    label: Literal["positive", "neutral", "negative"]
    score: Annotated[float, msgspec.Meta(ge=-1, le=1)]
    scorer: str = ""


class RateLimitChecked(msgspec.Struct, frozen=True, kw_only=True):
    """A rate-limit decision for one request: allowed, or denied by the named limit."""

    allowed: bool
    limit: str = ""
    """The limit that denied (e.g. `user:10/hour`), empty when allowed."""
    retry_after_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    rate_factor: float = 1.0
    """The adaptive factor applied to the per-second rate at the time."""
    policy_version: str = ""


class RouteDecided(msgspec.Struct, frozen=True, kw_only=True):
    """Which model a request goes to, and everything the decision was based on."""

    in_reply_to: NonEmpty
    model: NonEmpty
    chain: tuple[str, ...]
    """The model and its fallbacks, in the order they will be tried."""
    complexity: Annotated[float, msgspec.Meta(ge=0, le=1)]
    features: dict[str, float]
    band: str
    reason: Literal["table", "sticky", "requested"]
    policy_version: str
    learned: bool = False
    """The band's model was chosen by what feedback taught (routing.learning)."""
    scores: dict[str, float] = msgspec.field(default_factory=dict)
    """Learned routing: each candidate's posterior mean, or its Thompson sample if explored."""
    explored: bool = False


class ModelCalled(msgspec.Struct, frozen=True, kw_only=True):
    """One attempt at calling a model deployment, and how it ended."""

    in_reply_to: NonEmpty
    model: NonEmpty
    deployment: NonEmpty
    attempt: Annotated[int, msgspec.Meta(ge=1)]
    outcome: str
    """`ok`, or the error class: network, timeout, rate_limited, malformed_response,
    content_policy, context_too_long, circuit_open."""
    latency_ms: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    detail: str = ""
    retry_after_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0


class CircuitChanged(msgspec.Struct, frozen=True, kw_only=True):
    """A deployment's circuit breaker changed state."""

    deployment: NonEmpty
    from_state: str
    to_state: str


class RateAdjusted(msgspec.Struct, frozen=True, kw_only=True):
    """The adaptive limiter changed the per-second rate factor."""

    factor: Annotated[float, msgspec.Meta(gt=0, le=1)]
    reason: str


class DocumentAttached(msgspec.Struct, frozen=True, kw_only=True):
    """A document was attached to the context (its bytes travel in the event, size-limited)."""

    document_id: NonEmpty
    name: NonEmpty
    mime_type: NonEmpty
    size: Annotated[int, msgspec.Meta(ge=0)]
    sha256: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
    content: bytes
    """The document's bytes (base64 in JSON)."""


class DocumentRemoved(msgspec.Struct, frozen=True, kw_only=True):
    """A document was removed from the context."""

    document_id: NonEmpty


class TagsChanged(msgspec.Struct, frozen=True, kw_only=True):
    """The context's tags changed: what was added and what removed."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()


class ContextConfigured(msgspec.Struct, frozen=True, kw_only=True):
    """Per-context overrides of the service's defaults; an empty value removes an override."""

    overrides: dict[str, str]


class FeedbackGiven(msgspec.Struct, frozen=True, kw_only=True):
    """A user's verdict on a reply: thumbs, a 1-5 rating, or both, and why."""

    message_id: NonEmpty
    """The reply (ReplyCompleted.message_id) the feedback is about."""
    thumbs: Literal["up", "down", ""] = ""
    rating: Annotated[int, msgspec.Meta(ge=0, le=5)] = 0
    """1-5; 0 when only thumbs were given."""
    reason: str = ""
    model: str = ""
    """The model that wrote the reply (filled in by the context)."""
    band: str = ""
    """The complexity band the reply's request was routed in (what routing learns per)."""
    topic: str = ""
    """The topic of the question the reply answered (the quality projection's per-topic)."""


class AnomalyDetected(msgspec.Struct, frozen=True, kw_only=True):
    """A detector over the log saw a value beyond its threshold."""

    detector: NonEmpty
    """latency_baseline, error_rate, denial_rate, slow_request or memory_growth."""
    metric: NonEmpty
    observed: float
    threshold: float
    baseline: float = 0.0
    window_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    subject: str = ""
    """What it is about: a model, a context id, or a process name."""
    detail: str = ""


class MemoryPruned(msgspec.Struct, frozen=True, kw_only=True):
    """Conversation-memory entries of the tenant older than `before` were removed."""

    before: datetime
    max_age_days: Annotated[float, msgspec.Meta(gt=0)]
    entries: Annotated[int, msgspec.Meta(ge=0)] = 0
    """How many conversations the pruner removed (as it counted them)."""
    requested_by: str = ""


class UserForgotten(msgspec.Struct, frozen=True, kw_only=True):
    """An operator erased a user's content from the archive and the projections (a
    data-protection request); the audit chain still verifies."""

    user_id: NonEmpty
    events: Annotated[int, msgspec.Meta(ge=0)]
    """How many archived events had content erased."""
    requested_by: str = ""


class PluginChanged(msgspec.Struct, frozen=True, kw_only=True):
    """A plugin was loaded, reloaded, unloaded, failed or disabled."""

    plugin: NonEmpty
    version: str = ""
    change: Literal["loaded", "reloaded", "unloaded", "failed", "disabled"]
    detail: str = ""


class ProjectionsRebuilt(msgspec.Struct, frozen=True, kw_only=True):
    """An operator rebuilt projections from the archive."""

    projections: tuple[str, ...]
    events: Annotated[int, msgspec.Meta(ge=0)]
    since: datetime | None = None
    until: datetime | None = None
    requested_by: str = ""


class WorkflowStarted(msgspec.Struct, frozen=True, kw_only=True):
    """A workflow run began; the first event of stream `workflow:<run_id>`. It carries the
    definition it runs, so a resumed run follows the steps it started with."""

    run_id: NonEmpty
    workflow: NonEmpty
    digest: NonEmpty
    """SHA-256 of the definition's canonical JSON."""
    definition: dict[str, Any]
    inputs: dict[str, Any]
    requested_by: str = ""


class WorkflowStepStarted(msgspec.Struct, frozen=True, kw_only=True):
    """A step's action began; attempt > 1 is a retry, or a re-run after the worker died."""

    run_id: NonEmpty
    workflow: NonEmpty
    step: NonEmpty
    iteration: Annotated[int, msgspec.Meta(ge=1)] = 1
    attempt: Annotated[int, msgspec.Meta(ge=1)] = 1


class WorkflowStepCompleted(msgspec.Struct, frozen=True, kw_only=True):
    """A step's action returned (one event per loop iteration)."""

    run_id: NonEmpty
    workflow: NonEmpty
    step: NonEmpty
    duration_ms: Annotated[float, msgspec.Meta(ge=0)]
    output: Any = None
    iteration: Annotated[int, msgspec.Meta(ge=1)] = 1
    attempt: Annotated[int, msgspec.Meta(ge=1)] = 1


class WorkflowStepFailed(msgspec.Struct, frozen=True, kw_only=True):
    """A step's action raised, timed out, or its condition could not be evaluated."""

    run_id: NonEmpty
    workflow: NonEmpty
    step: NonEmpty
    error_class: NonEmpty
    message: str
    duration_ms: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    iteration: Annotated[int, msgspec.Meta(ge=1)] = 1
    attempt: Annotated[int, msgspec.Meta(ge=1)] = 1


class WorkflowStepSkipped(msgspec.Struct, frozen=True, kw_only=True):
    """A step's condition did not hold, so it did not run."""

    run_id: NonEmpty
    workflow: NonEmpty
    step: NonEmpty
    reason: str


class WorkflowFinished(msgspec.Struct, frozen=True, kw_only=True):
    """A workflow run ended: every step settled, or one failed for good."""

    run_id: NonEmpty
    workflow: NonEmpty
    status: Literal["completed", "failed"]
    duration_ms: Annotated[float, msgspec.Meta(ge=0)]
    outputs: dict[str, Any] = msgspec.field(default_factory=dict)
    error: str = ""


class ConfigChange(msgspec.Struct, frozen=True, kw_only=True):
    """One key's value before and after (secrets shown as their SHA-256 prefix)."""

    key: NonEmpty
    before: Any = None
    after: Any = None


class ConfigChanged(msgspec.Struct, frozen=True, kw_only=True):
    """The running service switched its configuration (`chatllm config use`)."""

    profile_before: str
    profile_after: str
    changes: tuple[ConfigChange, ...]
    applied: tuple[str, ...] = ()
    """Keys that took effect at once; the others take effect at the next restart."""
    requested_by: str = ""


KeyScope = Literal["chat", "ingest", "query", "admin"]


class KeyIssued(msgspec.Struct, frozen=True, kw_only=True):
    """An API key was issued (`chatllm key create`, or as the successor of a rotated key).
    The log holds the key's SHA-256, never the key."""

    key_id: NonEmpty
    sha256: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
    user: NonEmpty
    """Whom requests with the key are attributed to (the tenant is the envelope's)."""
    name: str = ""
    scopes: tuple[KeyScope, ...] = ("chat", "query")
    limit: str = ""
    """Requests the key may make, in limits notation ("600/minute"); empty: none."""
    expires_at: datetime | None = None
    issued_by: str = ""
    replaces: str = ""
    """The key this one succeeds (a rotation), or empty."""


class KeyRotated(msgspec.Struct, frozen=True, kw_only=True):
    """A key was rotated: `successor` replaces it, and it keeps working until `grace_until`
    (auth.rotation_grace_s after the rotation, or its own expiry if sooner)."""

    key_id: NonEmpty
    successor: NonEmpty
    grace_until: datetime
    rotated_by: str = ""


class KeyRevoked(msgspec.Struct, frozen=True, kw_only=True):
    """A key was revoked: from now on every API process refuses it."""

    key_id: NonEmpty
    revoked_by: str = ""
    reason: str = ""


class KnowledgeIngested(msgspec.Struct, frozen=True, kw_only=True):
    """A document of a knowledge source was added, updated or removed (re-ingestion touches
    only what changed)."""

    source: NonEmpty
    document: NonEmpty
    change: Literal["added", "updated", "removed"]
    digest: str = ""
    """SHA-256 of the document's bytes (empty once removed)."""
    passages: Annotated[int, msgspec.Meta(ge=0)] = 0
    embedder: str = ""


class PassageRef(msgspec.Struct, frozen=True, kw_only=True):
    source: NonEmpty
    document: NonEmpty
    chunk: Annotated[int, msgspec.Meta(ge=0)]
    score: float


class KnowledgeUsed(msgspec.Struct, frozen=True, kw_only=True):
    """Passages of the knowledge base were put before the model for a message."""

    in_reply_to: NonEmpty
    passages: tuple[PassageRef, ...]


class ReplyRewritten(msgspec.Struct, frozen=True, kw_only=True):
    """A plugin's after_reply changed a reply before it was sent: the text the user received."""

    message_id: NonEmpty
    """The ReplyCompleted whose content the user did not receive as such."""
    content: str
    plugins: tuple[str, ...] = ()
    """The plugins whose after_reply changed it, in the order they ran."""


class CacheHit(msgspec.Struct, frozen=True, kw_only=True):
    """A message was answered from the reply cache instead of a model; `similarity` lets a
    replay find false hits."""

    in_reply_to: NonEmpty
    kind: Literal["exact", "semantic"]
    similarity: float
    cached_message_id: NonEmpty
    """The ReplyCompleted whose content was reused."""
    cached_prompt: str = ""
    embedder: str = ""


Event = (
    ContextCreated
    | MessageReceived
    | ReplyCompleted
    | ReplyFailed
    | InputChecked
    | SentimentScored
    | RateLimitChecked
    | RouteDecided
    | ModelCalled
    | CircuitChanged
    | RateAdjusted
    | DocumentAttached
    | DocumentRemoved
    | TagsChanged
    | ContextConfigured
    | FeedbackGiven
    | AnomalyDetected
    | MemoryPruned
    | UserForgotten
    | ProjectionsRebuilt
    | PluginChanged
    | WorkflowStarted
    | WorkflowStepStarted
    | WorkflowStepCompleted
    | WorkflowStepFailed
    | WorkflowStepSkipped
    | WorkflowFinished
    | ConfigChanged
    | KnowledgeIngested
    | KnowledgeUsed
    | CacheHit
    | ReplyRewritten
    | KeyIssued
    | KeyRotated
    | KeyRevoked
)

# The schema version each type is written with today. Bump it only together with
# an upcaster from the previous version (events/upcasters.py) and its test.
CURRENT_SCHEMA: dict[type[Event], int] = {
    ContextCreated: 1,
    MessageReceived: 1,
    ReplyCompleted: 1,
    ReplyFailed: 1,
    InputChecked: 1,
    SentimentScored: 1,
    RateLimitChecked: 1,
    RouteDecided: 1,
    ModelCalled: 1,
    CircuitChanged: 1,
    RateAdjusted: 1,
    DocumentAttached: 1,
    DocumentRemoved: 1,
    TagsChanged: 1,
    ContextConfigured: 1,
    FeedbackGiven: 1,
    AnomalyDetected: 1,
    MemoryPruned: 1,
    UserForgotten: 1,
    ProjectionsRebuilt: 1,
    PluginChanged: 1,
    WorkflowStarted: 1,
    WorkflowStepStarted: 1,
    WorkflowStepCompleted: 1,
    WorkflowStepFailed: 1,
    WorkflowStepSkipped: 1,
    WorkflowFinished: 1,
    ConfigChanged: 1,
    KnowledgeIngested: 1,
    KnowledgeUsed: 1,
    CacheHit: 1,
    ReplyRewritten: 1,
    KeyIssued: 1,
    KeyRotated: 1,
    KeyRevoked: 1,
}
