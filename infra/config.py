"""Configuration: defaults < TOML file < named profile < environment (CHATLLM_...).

Every value remembers where it came from (`chatllm config show`). Errors name the
bad key, its source and why. Environment keys use `__` between section and key:
CHATLLM_HTTP__PORT=9000. CHATLLM_CONFIG names the file, CHATLLM_PROFILE the profile.
"""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from actors.limiter import LimitPolicy
from actors.router import Deployment, RoutingPolicy, default_deployments
from actors.sanitizer import SanitizerPolicy
from events import registered_types, topics
from infra.egress import EgressPolicy, EgressRefused, check_url
from streams.ingest import DEFAULT_TYPES

ENV_PREFIX = "CHATLLM_"
DEFAULT_FILE = "chatllm.toml"
# Environment variables of ours that are not settings: the file, the profile, the CLI's key.
_NOT_SETTINGS = frozenset({"CHATLLM_CONFIG", "CHATLLM_PROFILE", "CHATLLM_API_KEY"})


Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Positive = Annotated[int, msgspec.Meta(ge=1)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]


class _Section(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pass


class BrokerConfig(_Section):
    bootstrap_servers: str = ""
    """Kafka bootstrap servers; empty starts the embedded tansu broker."""
    embedded_port: Port = 0
    """Port of the embedded broker on 127.0.0.1; 0 picks a free one."""
    enable_idempotence: bool = False
    """Idempotent producer: turn on for real Kafka; tansu rejects it (InitProducerId)."""
    linger_ms: Annotated[int, msgspec.Meta(ge=0)] = 0
    """Producer linger: 0 keeps a chat turn fast (sends in one tick are batched anyway)."""
    request_timeout_ms: Positive = 15000
    delivery_timeout_ms: Positive = 30000
    """Upper bound for one append to be acknowledged; a send never waits forever."""
    max_record_bytes: Annotated[int, msgspec.Meta(ge=1024, le=64 * 1024 * 1024)] = 1_000_000
    """The largest event record the log takes (keep it under the topic's max.message.bytes):
    larger upstream events are refused at the door (413) or dead-lettered, never retried."""

    @property
    def max_request_bytes(self) -> int:
        """A producer's request limit with room for one largest record and its framing."""
        return max(1024 * 1024, self.max_record_bytes + 64 * 1024)


class TopicsConfig(_Section):
    events: str = topics.EVENTS
    ingest: str = topics.INGEST
    deadletter: str = topics.DEADLETTER
    observations: str = topics.OBSERVATIONS
    """What the archive writer derives for the stateful detectors (infra/services/processors.py)."""
    partitions: Positive = 4


class ClickHouseConfig(_Section):
    url: str = ""
    """http(s)://user:pass@host:8123 of a ClickHouse server; empty uses embedded chDB."""
    path: str = ".chatllm/chdb"
    """Data path of embedded chDB (one process per path)."""
    database: str = "chatllm"


class RayConfig(_Section):
    address: str = ""
    """Ray cluster address (ray://host:10001 or 'auto'); empty starts Ray locally."""
    num_cpus: int = 0
    """CPUs for a local Ray; 0 lets Ray decide."""
    shards: Positive = 2
    """Ray actors owning the tenants (contexts, limits, routers); a tenant lives on exactly one."""
    namespace: str = "chatllm"
    lease_ttl_s: PositiveFloat = 6.0
    """Write lease of a shard: a replaced shard stops writing within this time, and its
    replacement waits for the old lease to run out before its first write."""
    contexts_per_shard: Positive = 10_000
    """Contexts a shard keeps in memory; the least recently used are rebuilt from the log."""
    shard_transport: Literal["socket", "ray"] = "socket"
    """How chat turns reach a shard: `socket`, a direct connection to the shard that Ray
    placed (infra/ray/shardlink.py), or `ray`, an actor call per turn (~4 ms more CPU a turn)."""


class HttpConfig(_Section):
    host: str = "127.0.0.1"
    port: Port = 8000
    cors_origins: list[str] = msgspec.field(default_factory=list)
    """Browser origins allowed to call the API (CORS); empty: none (the default)."""
    max_body_bytes: Positive = 8 * 1024 * 1024
    metrics_public: bool = False
    """With auth.required, /metrics needs a key with the `query` scope (Prometheus sends one
    with `authorization` in its scrape config); true opens it to anyone who can reach it."""
    docs: bool = False
    """Serve the interactive API docs (/docs, /redoc). They load Swagger UI and ReDoc from a
    CDN, under a relaxed Content-Security-Policy; off by default. /openapi.json is always
    served."""
    """Larger request bodies are refused with 413 before they are read."""
    workers: Annotated[int, msgspec.Meta(ge=0, le=64)] = 0
    """API processes `chatllm up` runs on the port (they share the shards and the store);
    0 (the default): one per two cores, at least one. An API process spends about half of
    what a shard spends per turn (0.45 vs 0.9 ms measured), so the shards and the store need
    the other cores: on 2 cores, two API processes gave 12% fewer turns/s and 15% more CPU per
    turn than one. /metrics shows their turn counters summed, whichever process answers."""


class ModelConfig(_Section):
    demo_latency_ms: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    """Artificial latency of the offline demo model."""


class StreamsConfig(_Section):
    datadir: str = ".chatllm"
    """The stack's local working directory: the API processes' turn counters (api/), the
    anomaly processors' state and status (processors/), the embedded broker's log file."""
    batch_size: Positive = 1000
    batch_within_s: PositiveFloat = 0.2
    session_timeout_s: PositiveFloat = 6.0
    heartbeat_interval_s: PositiveFloat = 1.0
    rebalance_timeout_s: PositiveFloat = 3.0
    commit_interval_s: PositiveFloat = 1.0
    """How often written offsets are committed (a crash re-reads at most this much)."""
    fetch_wait_s: PositiveFloat = 0.5
    """How long the broker may hold a fetch for more events (bounds the lag when idle)."""
    fetch_min_bytes: Positive = 1_048_576
    """How much a consumer's fetch waits for (up to fetch_wait_s): fewer, fuller fetches. The
    embedded broker's cost per fetch grows with its log: with fetches that returned at once
    (0.1 s, 1 byte) its CPU per turn went from 0.3 to 13 ms over 100,000 turns, and the
    added latency from 2 to 8 ms; with 0.5 s and 1 MiB both stay flat."""
    finish_timeout_s: PositiveFloat = 10.0
    """On a stop, how long a batch in hand may take to finish (else it is left uncommitted
    and read again by the next owner)."""
    stuck_after_s: PositiveFloat = 30.0
    """A consumer holding one batch for longer than this is reported stuck by /healthz."""
    store_niceness: Annotated[int, msgspec.Meta(ge=0, le=19)] = 10
    """How far below the request path the store host runs (Unix nice): its inserts wait for
    turns on a busy machine instead of delaying them."""


class LogConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class TracingConfig(_Section):
    otlp_endpoint: str = ""
    """OTLP/HTTP collector base URL (e.g. http://127.0.0.1:4318); empty: spans are not exported."""
    export_delay_ms: Positive = 1000


class ContextsConfig(_Section):
    max_document_bytes: Annotated[int, msgspec.Meta(ge=1, le=768 * 1024)] = 256 * 1024
    """Largest attachable document (its bytes travel in an event; Kafka's default message
    limit is 1 MB, and base64 adds a third)."""


class MemoryConfig(_Section):
    max_age_days: PositiveFloat = 30.0
    """Conversation memory older than this is pruned (a MemoryPruned event, then redaction)."""
    prune_interval_s: Annotated[float, msgspec.Meta(ge=0)] = 3600.0
    """How often the projection worker prunes; 0 turns the schedule off."""


class AnomaliesConfig(_Section):
    """The streaming detectors (streams/detectors.py); see docs/queries.md."""

    enabled: bool = True
    latency_sigmas: PositiveFloat = 4.0
    latency_min_ms: Annotated[float, msgspec.Meta(ge=0)] = 250.0
    latency_warmup: Positive = 30
    slow_request_ms: PositiveFloat = 10_000.0
    window_s: PositiveFloat = 60.0
    min_requests: Positive = 20
    error_rate_max: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.2
    denial_rate_max: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.5
    rate_factor: PositiveFloat = 3.0
    memory_growth_mb: PositiveFloat = 256.0
    memory_growth_ratio: PositiveFloat = 0.5
    memory_sample_s: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    """How often process memory is sampled; 0 turns the memory detector off."""
    cooldown_s: Annotated[float, msgspec.Meta(ge=0)] = 60.0


class IngestConfig(_Section):
    stream_prefixes: list[Annotated[str, msgspec.Meta(min_length=1)]] = msgspec.field(
        default_factory=lambda: ["ext:"]
    )
    """Upstream events must use stream ids starting with one of these (never a context's)."""
    max_batch: Positive = 5000
    """Most events in one POST /v1/events."""
    allowed_types: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_TYPES))
    """The event types upstream systems may produce; the rest are refused with the reason
    (events that act on chat-llm itself, such as UserForgotten, are written by it only)."""
    max_append_attempts: Positive = 20
    """Tries (backing off up to 5 s) to append a valid upstream batch to the log before its
    events are dead-lettered with the error (`chatllm dlq retry` re-drives them)."""


class PluginsConfig(_Section):
    folder: str = ""
    """A folder of plugin files (*.py), hot-reloaded while the service runs; empty: none."""
    entry_points: bool = True
    """Also load the installed plugins (Python entry points, group `chatllm.plugins`)."""
    failure_limit: Positive = 3
    """Failures in a row after which a plugin's breaker disables it."""
    reload_interval_s: PositiveFloat = 1.0
    config: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    """Each plugin's own config, by plugin name (validated by the plugin's Config)."""


class WorkflowsConfig(_Section):
    folder: str = ""
    """A folder of workflow definitions (*.toml, *.yaml, *.py), read again when they change."""
    run: bool = True
    """Drive workflow runs in this process (`chatllm up`, `chatllm worker`)."""
    api_url: str = ""
    """Where a standalone worker sends chat steps (this service's HTTP API); `up` uses its
    own gateway."""
    api_key: str = ""
    """The API key for api_url, when the service requires one."""
    max_output_bytes: Positive = 256 * 1024
    """A step's output travels in an event: larger outputs fail the step."""
    http_timeout_s: PositiveFloat = 30.0
    """Timeout of one request of an http step."""


class CacheConfig(_Section):
    """The reply cache (actors/cache.py), one per shard: a tenant's replicas share it."""

    enabled: bool = False
    semantic: bool = True
    """Also answer paraphrases (embeds each message); off: identical messages only."""
    threshold: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.85
    """Cosine similarity at or above which a paraphrase is answered from the cache."""
    ttl_s: PositiveFloat = 3600.0
    max_entries: Positive = 10_000
    """Per shard; the least recently used scopes go first."""


class KnowledgeSource(_Section):
    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    path: str
    """A folder: Markdown, text and PDF documents (kind docs), or JSON FAQ files (kind faq)."""
    kind: Literal["docs", "faq"] = "docs"
    tenant: str = ""
    """The tenant whose requests may use it; empty: the default tenant."""


class KnowledgeConfig(_Section):
    sources: list[KnowledgeSource] = msgspec.field(default_factory=list)
    reingest_interval_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    """Re-ingest every source this often (only what changed is touched); 0: on demand."""
    chunk_chars: Annotated[int, msgspec.Meta(ge=100, le=4000)] = 800
    chunk_overlap: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 100
    attach: bool = False
    """Attach passages to every chat request (a request can say `knowledge: true/false`)."""
    attach_k: Annotated[int, msgspec.Meta(ge=1, le=20)] = 3
    min_score: Annotated[float, msgspec.Meta(ge=-1, le=1)] = 0.35
    """Passages less similar to the message than this are not attached."""


class ApiKey(_Section):
    """An API key, stored as its SHA-256 (`chatllm keys hash` prints it), mapped to who uses it."""

    sha256: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
    tenant: str
    user: str
    name: str = ""
    scopes: list[Literal["chat", "ingest", "query", "admin"]] = msgspec.field(
        default_factory=lambda: ["chat", "query"]
    )
    """What the key may do: chat (turns, its contexts), query (projections, logs, audit),
    ingest (upstream events, dead letters), admin (config, erasure, rebuilds, ingestion)."""
    limit: str = ""
    """Requests this key may make, in limits notation ("600/minute;10000/day"); empty: no
    per-key limit (the user and tenant limits still apply)."""


class AuthConfig(_Section):
    required: bool = False
    """Refuse requests without a known API key. Off for the local embedded default."""
    keys: list[ApiKey] = msgspec.field(default_factory=list)
    """Bootstrap keys. Keys issued with `chatllm key create` live in the log (KeyIssued,
    KeyRotated, KeyRevoked) and every API process follows them; these keep working beside
    them, and may be rotated or revoked the same way (by their id, `cfg-` and the first 12
    digits of the hash)."""
    rotation_grace_s: Annotated[float, msgspec.Meta(ge=0)] = 86_400.0
    """How long a rotated key keeps working beside its successor (24 h)."""


class Settings(_Section):
    """The whole configuration."""

    tenant: str = "default"
    """Tenant used when a request names none."""
    broker: BrokerConfig = msgspec.field(default_factory=BrokerConfig)
    topics: TopicsConfig = msgspec.field(default_factory=TopicsConfig)
    clickhouse: ClickHouseConfig = msgspec.field(default_factory=ClickHouseConfig)
    ray: RayConfig = msgspec.field(default_factory=RayConfig)
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)
    model: ModelConfig = msgspec.field(default_factory=ModelConfig)
    streams: StreamsConfig = msgspec.field(default_factory=StreamsConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    contexts: ContextsConfig = msgspec.field(default_factory=ContextsConfig)
    tracing: TracingConfig = msgspec.field(default_factory=TracingConfig)
    memory: MemoryConfig = msgspec.field(default_factory=MemoryConfig)
    ingest: IngestConfig = msgspec.field(default_factory=IngestConfig)
    plugins: PluginsConfig = msgspec.field(default_factory=PluginsConfig)
    workflows: WorkflowsConfig = msgspec.field(default_factory=WorkflowsConfig)
    cache: CacheConfig = msgspec.field(default_factory=CacheConfig)
    kb: KnowledgeConfig = msgspec.field(default_factory=KnowledgeConfig)
    anomalies: AnomaliesConfig = msgspec.field(default_factory=AnomaliesConfig)
    limits: LimitPolicy = msgspec.field(default_factory=LimitPolicy)
    routing: RoutingPolicy = msgspec.field(default_factory=RoutingPolicy)
    egress: EgressPolicy = msgspec.field(default_factory=EgressPolicy)
    """Which hosts workflow http steps and deployments' base_url may reach (infra/egress.py)."""
    sanitizer: SanitizerPolicy = msgspec.field(default_factory=SanitizerPolicy)
    deployments: list[Deployment] = msgspec.field(default_factory=default_deployments)
    """Where each model is served; the routing table names models, not deployments."""


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key, its source and why."""


@dataclass(frozen=True)
class LoadedConfig:
    """The effective settings and, per dotted key, where its value came from."""

    settings: Settings
    sources: dict[str, str]
    values: dict[str, Any]
    path: str | None = None
    profile: str = ""


# Maps whose keys are data (model names, error classes), not settings: set as a whole.
_WHOLE_MAPS = frozenset({"routing.fallbacks", "routing.retries", "plugins.config"})


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and dotted not in _WHOLE_MAPS:
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for dotted, value in flat.items():
        *parents, leaf = dotted.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


_DEFAULTS = _flatten(msgspec.to_builtins(Settings()))


def settings_env(settings: Settings) -> dict[str, str]:
    """`settings` as CHATLLM_* environment variables (only what differs from the defaults):
    how a child process (the processors' worker) gets exactly its parent's configuration."""
    out = {}
    for key, value in _flatten(msgspec.to_builtins(settings)).items():
        if key not in _DEFAULTS or value == _DEFAULTS[key] or value is None:
            continue
        name = ENV_PREFIX + key.upper().replace(".", "__")
        if isinstance(value, str):
            out[name] = value
        else:
            out[name] = msgspec.json.encode(value).decode()
    return out


def _merge(
    values: dict[str, Any], sources: dict[str, str], layer: Mapping[str, Any], source: str
) -> None:
    for key, value in _flatten(layer).items():
        if key not in _DEFAULTS:
            raise ConfigError(f"unknown config key {key!r} (from {source})")
        values[key] = value
        sources[key] = source


def load_config(
    path: str | os.PathLike[str] | None = None,
    profile: str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> LoadedConfig:
    """Resolve the layers into validated Settings; ConfigError names what is wrong."""
    env = os.environ if env is None else env
    values = dict(_DEFAULTS)
    sources = dict.fromkeys(_DEFAULTS, "default")

    path = (
        path
        or env.get(f"{ENV_PREFIX}CONFIG")
        or (DEFAULT_FILE if Path(DEFAULT_FILE).is_file() else None)
    )
    profile = profile or env.get(f"{ENV_PREFIX}PROFILE") or None
    profiles: dict[str, Any] = {}
    if path:
        file = Path(path)
        try:
            document = tomllib.loads(file.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {str(file)!r} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {str(file)!r} is not valid TOML: {exc}") from None
        profiles = document.pop("profiles", {})
        _merge(values, sources, document, f"file {file}")
    if profile:
        if profile not in profiles:
            known = ", ".join(sorted(profiles)) or "none"
            raise ConfigError(f"profile {profile!r} is not defined (profiles: {known})")
        _merge(values, sources, profiles[profile], f"profile {profile}")

    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name in _NOT_SETTINGS:
            continue
        key = name[len(ENV_PREFIX) :].lower().replace("__", ".")
        if key not in _DEFAULTS:
            raise ConfigError(f"unknown config key {key!r} (from env {name})")
        if isinstance(_DEFAULTS[key], list | tuple | dict):
            try:  # lists and maps come as JSON in the environment
                values[key] = msgspec.json.decode(raw)
            except msgspec.DecodeError as exc:
                raise ConfigError(
                    f"config key {key!r} (from env {name}) is not JSON: {exc}"
                ) from None
        else:
            values[key] = raw
        sources[key] = f"env {name}"

    for key, value in (overrides or {}).items():
        if key not in _DEFAULTS:
            raise ConfigError(f"unknown config key {key!r} (from override)")
        values[key] = value
        sources[key] = "override"

    try:
        # strict=False lets environment strings become ints, floats and bools.
        settings = msgspec.convert(_unflatten(values), Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(str(exc), sources)) from None
    _check_egress(settings, sources)
    _check_parsed_later(settings, sources)
    _check_models(settings, sources)
    _check_ingest(settings, sources)
    return LoadedConfig(
        settings=settings,
        sources=sources,
        values=values,
        path=str(path) if path else None,
        profile=profile or "",
    )


# Keys a running service applies at once when its config changes (`chatllm config use`);
# the others take effect at the next start.
LIVE_KEYS = ("limits.", "routing.", "deployments", "sanitizer.", "log.level", "plugins.config",
             "plugins.failure_limit")  # fmt: skip
# Values that are secrets (or may hold one): a change shows their digest, never the value.
SECRET_KEYS = frozenset(
    {"auth.keys", "workflows.api_key", "clickhouse.url", "tracing.otlp_endpoint"}
)


_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):[^@/\s]+@", re.I)


def masked(key: str, value: Any) -> Any:
    """`value` as `config show` prints it: a secret key's value as `***`, and a password
    inside a URL (clickhouse.url = "http://user:pw@host") as `***`, wherever it sits."""
    if key in ("workflows.api_key",) and value:
        return "***"
    if isinstance(value, str):
        return _URL_PASSWORD.sub(r"\g<scheme>\g<user>:***@", value)
    if isinstance(value, list | tuple):
        return [masked("", v) for v in value]
    if isinstance(value, dict):
        return {k: masked("", v) for k, v in value.items()}
    return value


def is_live(key: str) -> bool:
    return key.startswith(LIVE_KEYS)


def changes(before: LoadedConfig, after: LoadedConfig) -> list[tuple[str, Any, Any]]:
    """(key, before, after) of every key whose value differs, secrets as digests."""

    def shown(key: str, value: Any) -> Any:
        if key in SECRET_KEYS and value:
            digest = hashlib.sha256(msgspec.json.encode(value)).hexdigest()
            return f"sha256:{digest[:12]}"
        return value

    return [
        (key, shown(key, before.values.get(key)), shown(key, after.values[key]))
        for key in sorted(after.values)
        if before.values.get(key) != after.values[key]
    ]


def _check_egress(settings: Settings, sources: Mapping[str, str]) -> None:
    """A deployment's base_url must be one the egress policy lets chat-llm reach (checked
    as written here; workflow http steps are checked, names resolved, at each request)."""
    for d in settings.deployments:
        if d.base_url:
            try:
                check_url(d.base_url, settings.egress, resolver=None)
            except EgressRefused as exc:
                raise ConfigError(
                    f"invalid config key 'deployments' (from {sources['deployments']}): "
                    f"deployment {d.name!r}: {exc}"
                ) from None


def _check_parsed_later(settings: Settings, sources: Mapping[str, str]) -> None:
    """The values other code parses later (limits notation, regular expressions, band
    thresholds, URLs) are parsed here, at start, so a bad one names its key, its source and
    why, instead of failing on the first request with a message that names no key."""
    from urllib.parse import urlsplit

    from limits import parse_many

    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(
            f"invalid config key {key!r} (from {sources.get(key, 'default')}): {why}"
        )

    for key in ("limits.user", "limits.tenant"):
        value = getattr(settings.limits, key.split(".")[1])
        if not value:
            continue  # empty: no such limit
        try:
            parse_many(value)
        except ValueError:
            raise bad(key, f'{value!r} is not limits notation (e.g. "600/hour;5000/day")') from None
    for k in settings.auth.keys:  # a typo must not silently mean "no limit"
        if k.limit:
            try:
                parse_many(k.limit)
            except ValueError as exc:
                raise bad(
                    "auth.keys", f"key of {k.tenant}/{k.user} has limit {k.limit!r}: {exc}"
                ) from None
    for pattern in settings.sanitizer.block_patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise bad(
                "sanitizer.block_patterns", f"{pattern!r} is not a regular expression: {exc}"
            ) from None
    bands = settings.routing.bands
    thresholds = [b.max_complexity for b in bands]
    if any(not 0 <= t <= 1 for t in thresholds) or thresholds != sorted(thresholds):
        raise bad(
            "routing.bands",
            f"max_complexity must rise from band to band within 0..1, got {thresholds}",
        )
    if bands and thresholds[-1] < 1:
        raise bad(
            "routing.bands",
            f"the last band must take max_complexity 1.0 (every request), got {thresholds[-1]}",
        )
    urls = {
        "clickhouse.url": settings.clickhouse.url,
        "tracing.otlp_endpoint": settings.tracing.otlp_endpoint,
        "workflows.api_url": settings.workflows.api_url,
    }
    for key, url in urls.items():
        if url:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise bad(key, "is not an http(s) URL with a host")


def _check_ingest(settings: Settings, sources: Mapping[str, str]) -> None:
    """Upstream types must be event types; chat contexts may not look like upstream streams."""
    unknown = sorted(set(settings.ingest.allowed_types) - set(registered_types()))
    if unknown:
        raise ConfigError(
            f"invalid config key 'ingest.allowed_types' (from"
            f" {sources['ingest.allowed_types']}): {unknown} are not event types"
        )


def _check_models(settings: Settings, sources: Mapping[str, str]) -> None:
    """The routing table may only name models that some deployment serves."""
    served = {d.model for d in settings.deployments}
    for band in settings.routing.bands:
        if band.model not in served:
            raise ConfigError(
                f"invalid config key 'routing.bands' (from {sources['routing.bands']}): band "
                f"{band.name!r} routes to model {band.model!r}, which no deployment serves "
                f"(deployments serve: {', '.join(sorted(served))})"
            )
    for band in settings.routing.bands:
        unknown = sorted(set(band.candidates) - served)
        if unknown:
            raise ConfigError(
                f"invalid config key 'routing.bands' (from {sources['routing.bands']}): band "
                f"{band.name!r} lists candidates {unknown} that no deployment serves"
            )
    names = [d.name for d in settings.deployments]
    if len(names) != len(set(names)):
        raise ConfigError(
            f"invalid config key 'deployments' (from {sources['deployments']}): "
            "deployment names must be unique"
        )


def _explain(message: str, sources: Mapping[str, str]) -> str:
    match = re.search(r" - at `\$\.(.+)`$", message)
    if not match:
        return f"invalid configuration: {message}"
    key = match.group(1)
    why = message[: match.start()]
    return f"invalid config key {key!r} (from {sources.get(key, 'default')}): {why}"
