"""Workflows in the service: definitions from files and Python, the step actions, the
runner that drives runs from the log, and the read side of runs.

A run lives on the log as stream `workflow:<run_id>`. The runner is a consumer group on the
event log that folds those streams (actors/workflow.py) and drives each unfinished run of
the partitions it owns. It commits, per partition, no further than the first event of its
oldest unfinished run, so a runner that dies is replaced by one that reads every such run
back, sees which steps completed, and goes on from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.util
import inspect
import logging
import math
import re
import sys
import time
import tomllib
import types
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import msgspec

from actors.context import is_text
from actors.workflow import (
    STREAM_PREFIX,
    FailStep,
    FinishRun,
    RunState,
    SkipStep,
    StartStep,
    Step,
    WorkflowError,
    WorkflowSpec,
    decide,
    evolve,
    fold,
    next_event,
    parse_spec,
    validate,
)
from actors.workflow import started as started_event
from events import (
    DecodeError,
    DocumentAttached,
    DocumentRemoved,
    Envelope,
    Event,
    WorkflowFinished,
    WorkflowStepCompleted,
    WorkflowStepFailed,
    WorkflowStepSkipped,
    WorkflowStepStarted,
    decode,
)
from infra.adapters.clock import SystemClock, new_trace_id
from infra.adapters.kafka.clients import new_consumer
from infra.egress import EgressPolicy, EgressRefused, check_url
from streams.loop import LoopHealth

log = logging.getLogger(__name__)

RUNNER_GROUP = "chatllm-workflows"
SUFFIXES = (".toml", ".yaml", ".yml", ".py")


# ---- definitions ---------------------------------------------------------------------


@dataclass(frozen=True)
class Definition:
    spec: WorkflowSpec
    source: str
    """`file:<path>` or `python`."""


@dataclass
class Catalog:
    """The workflows this process knows: a folder of TOML, YAML and Python files (read again
    when they change) and any registered from Python."""

    folder: Path | None = None
    registered: dict[str, WorkflowSpec] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    """Files that could not be loaded, with why."""
    _files: dict[Path, tuple[str, list[WorkflowSpec]]] = field(default_factory=dict)
    _stats: dict[Path, tuple[int, int]] = field(default_factory=dict)
    """(mtime_ns, size) of each file when it was last read."""

    def register(self, spec: WorkflowSpec) -> WorkflowSpec:
        """Add a workflow defined in Python (validated now)."""
        validate(spec, "python")
        self.registered[spec.name] = spec
        return spec

    def definitions(self) -> dict[str, Definition]:
        found = {name: Definition(spec, "python") for name, spec in self.registered.items()}
        for path, (_, specs) in self._scan().items():
            for spec in specs:
                if spec.name in found:
                    self.errors[str(path)] = (
                        f"workflow {spec.name!r} is also defined in {found[spec.name].source}"
                    )
                    continue
                found[spec.name] = Definition(spec, f"file:{path}")
        return dict(sorted(found.items()))

    def get(self, name: str) -> WorkflowSpec:
        definitions = self.definitions()
        if name not in definitions:
            known = ", ".join(definitions) or "none"
            raise KeyError(f"no workflow named {name!r} (workflows: {known})")
        return definitions[name].spec

    def _scan(self) -> dict[Path, tuple[str, list[WorkflowSpec]]]:
        if self.folder is None or not self.folder.is_dir():
            return {}
        present = sorted(p for p in self.folder.iterdir() if p.suffix in SUFFIXES)
        self.errors = {}
        for path in present:
            try:
                stat = path.stat()
                if path in self._files and self._stats.get(path) == (
                    stat.st_mtime_ns,
                    stat.st_size,
                ):
                    continue  # unchanged since it loaded: not read again on every request
                data = path.read_bytes()
            except OSError as exc:
                self.errors[str(path)] = str(exc)
                continue
            digest = hashlib.sha256(data).hexdigest()
            self._stats[path] = (stat.st_mtime_ns, stat.st_size)
            if path in self._files and self._files[path][0] == digest:
                continue
            try:
                self._files[path] = (digest, load_file(path, data, digest))
            except (WorkflowError, ValueError, SyntaxError, ImportError) as exc:
                self._files.pop(path, None)
                self.errors[str(path)] = str(exc)
        for gone in set(self._files) - set(present):
            del self._files[gone]
            self._stats.pop(gone, None)
        return self._files


def load_file(path: Path, data: bytes, digest: str = "") -> list[WorkflowSpec]:
    """The workflows one file defines: a TOML or YAML document (one workflow, or a
    `workflows` list), or a Python module with WORKFLOW or WORKFLOWS."""
    source = f"file {path}"
    if path.suffix == ".py":
        module = import_module_file(path, digest)
        specs = getattr(module, "WORKFLOWS", None) or [getattr(module, "WORKFLOW", None)]
        if not all(isinstance(s, WorkflowSpec) for s in specs):
            raise WorkflowError(f"{source}: define WORKFLOW (or WORKFLOWS) as WorkflowSpec")
        for spec in specs:
            validate(spec, source)
        return list(specs)
    try:
        if path.suffix == ".toml":
            document: Any = tomllib.loads(data.decode())
        else:
            import yaml

            document = yaml.safe_load(data)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise WorkflowError(f"{source} is not valid TOML: {exc}") from None
    except Exception as exc:  # yaml.YAMLError and its kin
        raise WorkflowError(f"{source} is not valid YAML: {exc}") from None
    if not isinstance(document, dict):
        raise WorkflowError(f"{source}: expected a table of workflow fields")
    documents = document.get("workflows", [document])
    return [parse_spec(d, source) for d in documents]


def import_module_file(path: Path, digest: str = "") -> types.ModuleType:
    """Import a workflow's Python file under a stable name (`chatllm_workflow_<stem>`), so
    its functions are found by `module:function` in any process that loads the folder."""
    name = f"chatllm_workflow_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise WorkflowError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    previous = sys.modules.get(name)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        if previous is not None:
            sys.modules[name] = previous
        else:
            sys.modules.pop(name, None)
        raise
    return module


# ---- actions -------------------------------------------------------------------------


@dataclass(frozen=True)
class StepContext:
    """What an action knows about the step it runs for."""

    run_id: str
    workflow: str
    step: str
    iteration: int
    attempt: int
    tenant_id: str
    user_id: str
    inputs: dict[str, Any]


Action = Callable[[dict[str, Any], StepContext], Awaitable[Any]]


class StepFailure(Exception):
    """An action failed in a way it can name (`error_class`)."""

    def __init__(self, error_class: str, message: str) -> None:
        super().__init__(message)
        self.error_class = error_class


class ChatPort(Protocol):
    async def chat(
        self, *, tenant_id: str, user_id: str, context_id: str, message: str, model: str
    ) -> dict[str, Any]:
        """One chat turn; {reply, model, context_id, message_id, ...} or StepFailure."""
        ...


class KnowledgePort(Protocol):
    async def search(
        self, *, tenant_id: str, context_id: str, query: str, k: int
    ) -> list[dict[str, Any]]:
        """The k passages that best match `query`."""
        ...


def _param(params: Mapping[str, Any], name: str, kind: type | tuple[type, ...] = str) -> Any:
    if name not in params:
        raise StepFailure("BadParams", f"the step needs param {name!r}")
    value = params[name]
    if not isinstance(value, kind):
        raise StepFailure("BadParams", f"param {name!r} has the wrong type")
    return value


def chat_action(port: ChatPort | None) -> Action:
    async def chat(params: dict[str, Any], step: StepContext) -> Any:
        if port is None:
            raise StepFailure(
                "Unavailable", "chat steps need the gateway (chatllm up) or workflows.api_url"
            )
        return await port.chat(
            tenant_id=step.tenant_id,
            user_id=str(params.get("user") or step.user_id),
            context_id=str(params.get("context") or f"workflow-{step.run_id}"),
            message=_param(params, "message"),
            model=str(params.get("model", "")),
        )

    return chat


def kb_action(port: KnowledgePort | None) -> Action:
    async def kb(params: dict[str, Any], step: StepContext) -> Any:
        if port is None:
            raise StepFailure("Unavailable", "kb steps need the store")
        k = params.get("k", 3)
        if not isinstance(k, int) or not 1 <= k <= 50:
            raise StepFailure("BadParams", "param 'k' must be an integer in 1..50")
        return await port.search(
            tenant_id=step.tenant_id,
            context_id=str(params.get("context", "")),
            query=_param(params, "query"),
            k=k,
        )

    return kb


def http_action(timeout_s: float = 30.0, egress: EgressPolicy | None = None) -> Action:
    """A step that calls a URL; the egress policy (the safe default unless given) decides
    which hosts it may reach, by every address a name resolves to. Redirects are not
    followed (one could lead anywhere)."""
    policy = egress or EgressPolicy()

    async def http(params: dict[str, Any], step: StepContext) -> Any:
        import httpx

        method = str(params.get("method", "GET")).upper()
        try:
            await asyncio.to_thread(check_url, _param(params, "url"), policy)
        except EgressRefused as exc:
            raise StepFailure("EgressRefused", str(exc)) from None
        expect = params.get("expect") or list(range(200, 300))
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            try:
                response = await client.request(
                    method,
                    _param(params, "url"),
                    json=params.get("json"),
                    headers=params.get("headers"),
                    params=params.get("query"),
                )
            except httpx.HTTPError as exc:
                raise StepFailure("HttpError", f"{method} {params['url']}: {exc!r}") from None
        if response.status_code not in expect:
            raise StepFailure(
                "HttpStatus",
                f"{method} {params['url']} answered {response.status_code}: {response.text[:500]}",
            )
        try:
            body: Any = response.json()
        except ValueError:
            body = response.text
        return {"status": response.status_code, "body": body}

    return http


class PluginSteps(Protocol):
    async def run_step(self, plugin: str, params: dict[str, Any], step: Any) -> Any: ...


def plugin_action(plugins: PluginSteps | None) -> Action:
    async def plugin(params: dict[str, Any], step: StepContext) -> Any:
        if plugins is None:
            raise StepFailure("Unavailable", "no plugins are loaded in this process")
        name = _param(params, "plugin")
        rest = {k: v for k, v in params.items() if k != "plugin"}
        return await plugins.run_step(name, rest, step)

    return plugin


def resolve_function(reference: str) -> Callable[..., Any]:
    """`module:qualified.name` to the function it names (imported if need be)."""
    module_name, _, qualname = reference.partition(":")
    if not module_name or not qualname:
        raise StepFailure("BadParams", f"function {reference!r} is not 'module:name'")
    try:
        target: Any = sys.modules.get(module_name) or importlib.import_module(module_name)
        for part in qualname.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise StepFailure("BadParams", f"cannot find function {reference!r}: {exc}") from None
    if not callable(target):
        raise StepFailure("BadParams", f"{reference!r} is not callable")
    return target


async def python_action(params: dict[str, Any], step: StepContext) -> Any:
    fn = resolve_function(_param(params, "function"))
    rest = {k: v for k, v in params.items() if k != "function"}
    result = fn(rest, step)
    if inspect.isawaitable(result):
        result = await result
    return result


def python_step(step_id: str, fn: Callable[..., Any], **fields: Any) -> Step:
    """A step that calls a Python function `fn(params, step)` (sync or async), found again
    by its module and name when a run resumes in another process."""
    params = {**fields.pop("params", {}), "function": f"{fn.__module__}:{fn.__qualname__}"}
    return Step(id=step_id, action="python", params=params, **fields)


def builtin_actions(
    *,
    chat: ChatPort | None = None,
    knowledge: KnowledgePort | None = None,
    plugins: PluginSteps | None = None,
    http_timeout_s: float = 30.0,
    egress: EgressPolicy | None = None,
) -> dict[str, Action]:
    return {
        "chat": chat_action(chat),
        "kb": kb_action(knowledge),
        "http": http_action(http_timeout_s, egress),
        "plugin": plugin_action(plugins),
        "python": python_action,
    }


class GatewayChat:
    """Chat steps through this process's gateway (one actor round trip, like a request)."""

    def __init__(self, gateway: Any) -> None:
        self.gateway = gateway
        self.clock = SystemClock()

    async def chat(
        self, *, tenant_id: str, user_id: str, context_id: str, message: str, model: str
    ) -> dict[str, Any]:
        from actors.chat import ChatRequest
        from actors.context import RequestMeta
        from actors.ports import ChatMessage

        meta = RequestMeta(
            context_id=context_id,
            tenant_id=tenant_id,
            user_id=user_id,
            trace_id=new_trace_id(),
            correlation_id=self.clock.new_event_id(),
        )
        message_id = self.clock.new_event_id()
        outcome = await self.gateway.turn(
            ChatRequest(
                meta=meta,
                messages=(ChatMessage(role="user", content=message, message_id=message_id),),
                model=model,
            )
        )
        if outcome.status != "ok":
            raise StepFailure(outcome.error_class or outcome.status, outcome.detail)
        return {
            "reply": outcome.reply,
            "model": outcome.model,
            "context_id": outcome.context_id,
            "message_id": outcome.message_id,
            "tokens": outcome.prompt_tokens + outcome.completion_tokens,
        }


class HttpChat:
    """Chat steps from a standalone worker, through the service's HTTP API."""

    def __init__(self, base_url: str, api_key: str = "", timeout_s: float = 120.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout_s = timeout_s

    async def chat(
        self, *, tenant_id: str, user_id: str, context_id: str, message: str, model: str
    ) -> dict[str, Any]:
        import httpx

        headers = {**self.headers, "X-Tenant-Id": tenant_id}
        async with httpx.AsyncClient(base_url=self.base_url, timeout=self.timeout_s) as client:
            response = await client.post(
                f"/v1/contexts/{context_id}/messages",
                json={"content": message, "user_id": user_id, "model": model or None},
                headers=headers,
            )
        if response.status_code != 200:
            raise StepFailure(f"Http{response.status_code}", response.text[:500])
        turn = response.json()
        return {
            "reply": turn["reply"],
            "model": turn["model"],
            "context_id": context_id,
            "message_id": turn.get("message_id", ""),
        }


class ArchivedDocuments:
    """kb steps: with a `context`, the text documents attached to that context (read from
    the archive, ranked by BM25 over their paragraphs); without, the knowledge base."""

    def __init__(self, store: Any, knowledge: Any = None) -> None:
        self.store = store
        self.knowledge = knowledge

    async def search(
        self, *, tenant_id: str, context_id: str, query: str, k: int
    ) -> list[dict[str, Any]]:
        if not context_id:
            if self.knowledge is None:
                raise StepFailure("Unavailable", "no knowledge base in this process")
            found = await self.knowledge.search(tenant_id, query, k)
            return [msgspec.to_builtins(r) for r in found]
        documents: dict[str, DocumentAttached] = {}
        for record in await self.store.stream_events(tenant_id, context_id):
            if record.type not in ("DocumentAttached", "DocumentRemoved"):
                continue
            p = decode(record.body.encode()).payload
            if isinstance(p, DocumentAttached) and is_text(p.mime_type):
                documents[p.document_id] = p
            elif isinstance(p, DocumentRemoved):
                documents.pop(p.document_id, None)
        return rank_passages(documents.values(), query, k)


_WORD = re.compile(r"\w+", re.UNICODE)


def _terms(text: str) -> list[str]:
    """Lower-cased words, a plural's "s" dropped (refunds ~ refund): a stemmer's first step."""
    words = (w.lower() for w in _WORD.findall(text))
    return [w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w for w in words]


def rank_passages(
    documents: Iterable[DocumentAttached], query: str, k: int
) -> list[dict[str, Any]]:
    """The k paragraphs that score best for `query` under BM25 (k1=1.2, b=0.75)."""
    passages = [
        (doc, text.strip())
        for doc in documents
        for text in re.split(r"\n\s*\n", doc.content.decode(errors="replace"))
        if text.strip()
    ]
    if not passages:
        return []
    tokens = [Counter(_terms(text)) for _, text in passages]
    average = sum(sum(t.values()) for t in tokens) / len(tokens) or 1.0
    terms = set(_terms(query))
    frequency = {t: sum(1 for c in tokens if t in c) for t in terms}
    scored = []
    for (doc, text), counts in zip(passages, tokens, strict=True):
        length = sum(counts.values())
        score = 0.0
        for term in terms:
            tf = counts.get(term, 0)
            if tf:
                idf = math.log(
                    1 + (len(passages) - frequency[term] + 0.5) / (frequency[term] + 0.5)
                )
                score += idf * tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * length / average))
        if score > 0:
            scored.append((score, doc, text))
    scored.sort(key=lambda item: -item[0])
    return [
        {"document_id": d.document_id, "name": d.name, "score": round(s, 4), "passage": t}
        for s, d, t in scored[:k]
    ]


# ---- starting and reading runs ---------------------------------------------------------


class Appender(Protocol):
    async def append(self, events: Any) -> None: ...


async def start_run(
    log_sink: Appender,
    spec: WorkflowSpec,
    inputs: Mapping[str, Any],
    *,
    tenant_id: str,
    user_id: str,
    trace_id: str | None = None,
) -> str:
    """Append a new run of `spec` to the log (the runner picks it up); its run id.
    WorkflowError if the inputs do not fit the workflow's input schema."""
    clock = SystemClock()
    run_id = clock.new_event_id()
    event = started_event(
        spec,
        inputs,
        run_id=run_id,
        tenant_id=tenant_id,
        user_id=user_id,
        at=clock.now(),
        trace_id=trace_id or new_trace_id(),
        span_id=clock.new_span_id(),
    )
    await log_sink.append([event])
    return run_id


async def read_run(store: Any, tenant_id: str, run_id: str) -> tuple[RunState | None, list[Any]]:
    """A run as the archive has it: its state and its events (in stream order)."""
    records = await store.stream_events(tenant_id, STREAM_PREFIX + run_id)
    events = [decode(r.body.encode()) for r in records]
    return fold(events), events


# ---- the runner ----


def _about(state: RunState, step: str) -> dict[str, Any]:
    """The fields every step event of a run carries."""
    return {"run_id": state.run_id, "workflow": state.spec.name, "step": step}


@dataclass(frozen=True, kw_only=True)
class RunnerSettings:
    bootstrap_servers: str
    topic: str
    group: str = RUNNER_GROUP
    session_timeout_s: float = 6.0
    heartbeat_interval_s: float = 1.0
    rebalance_timeout_s: float = 3.0
    fetch_wait_s: float = 0.5
    fetch_min_bytes: int = 1_048_576
    """How much a fetch waits for (up to fetch_wait_s): fewer, fuller fetches. The embedded
    broker scans its in-memory log on every fetch, so back-to-back small fetches made its CPU
    per turn grow with the log (0.25 -> 13 ms after 100,000 turns)."""
    commit_interval_s: float = 1.0
    max_output_bytes: int = 256 * 1024


@dataclass
class _Tracked:
    state: RunState
    partition: Any
    first_offset: int
    driver: asyncio.Task[None] | None = None


async def _lag(consumer: Any) -> int | None:
    """Records on the consumer's partitions past its position (None until known)."""
    total = 0
    for tp in consumer.assignment():
        high = consumer.highwater(tp)
        if high is None:
            return None
        total += max(0, high - await consumer.position(tp))
    return total


class WorkflowRunner:
    """Drives the runs of the partitions it owns; several runners share them as a group.
    Long as a class: its consume loop and a run's steps (start, step, retry, finish) are
    its methods, each short. It keeps its own loop beside streams' BatchLoop: BatchLoop
    commits a batch once it is handled, while a runner holds a partition's offset at the
    first event of its oldest unfinished run (runs outlive batches, and a rebalance re-reads
    them), and drives runs only once its partition has been read to the end."""

    def __init__(
        self, settings: RunnerSettings, log_sink: Appender, actions: Mapping[str, Action]
    ) -> None:
        self.settings = settings
        self.sink = log_sink
        self.actions = dict(actions)
        self.runs: dict[str, _Tracked] = {}
        self.finished = 0
        self.steps_run = 0
        self._clock = SystemClock()
        self._consumer: Any = None
        self._ready: set[Any] = set()
        self._appending: set[asyncio.Task[None]] = set()
        self.health = LoopHealth(settings.group)
        """Its consumer: running, lag, why it stopped (for /healthz)."""

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[WorkflowRunner]:
        task = asyncio.create_task(self._consume(), name="workflow-runner")
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- consuming

    async def _consume(self) -> None:
        from aiokafka import ConsumerRebalanceListener
        from aiokafka.errors import CommitFailedError, IllegalStateError

        s = self.settings
        runner = self

        class Listener(ConsumerRebalanceListener):
            async def on_partitions_revoked(self, revoked: Any) -> None:
                await runner._drop_all()

            async def on_partitions_assigned(self, assigned: Any) -> None:
                # Every owned partition is read again from its commit: the runs that were
                # unfinished there are folded back before any of them is driven.
                consumer = runner._consumer
                if consumer is None:  # a join that completed while the runner stops
                    return
                for tp in assigned:
                    committed = await consumer.committed(tp)
                    if committed is None:
                        await consumer.seek_to_beginning(tp)
                    else:
                        consumer.seek(tp, committed)

        self._consumer = consumer = new_consumer(
            bootstrap_servers=s.bootstrap_servers,
            group_id=s.group,
            client_id=f"{s.group}-runner",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=int(s.fetch_wait_s * 1000),
            fetch_min_bytes=s.fetch_min_bytes,
            session_timeout_ms=int(s.session_timeout_s * 1000),
            heartbeat_interval_ms=int(s.heartbeat_interval_s * 1000),
            rebalance_timeout_ms=int(s.rebalance_timeout_s * 1000),
        )
        consumer.subscribe([s.topic], listener=Listener())
        committed_at = time.monotonic()
        health = self.health
        try:
            await consumer.start()  # inside the try: a stop during start still closes it
            health.running, health.stopped = True, ""
            while True:
                fetched = await consumer.getmany(timeout_ms=int(s.fetch_wait_s * 1000) + 100)
                for tp, records in fetched.items():
                    for record in records:
                        if record.key and record.key.startswith(STREAM_PREFIX.encode()):
                            await self._fold(tp, record)
                for tp in consumer.assignment():
                    if tp not in self._ready:
                        high = consumer.highwater(tp)
                        if high is not None and await consumer.position(tp) >= high:
                            self._ready.add(tp)
                self._drive_ready()
                health.lag = await _lag(consumer)
                if time.monotonic() - committed_at >= s.commit_interval_s:
                    committed_at = time.monotonic()
                    try:
                        await self._commit()
                    except (CommitFailedError, IllegalStateError) as exc:
                        log.info("workflow offsets not committed (%s)", exc)
        except Exception as exc:
            health.stopped = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            health.running = False
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._drop_all(commit=True), 30)
            with contextlib.suppress(Exception):
                await consumer.stop()
            self._consumer = None

    async def _fold(self, tp: Any, record: Any) -> None:
        try:
            event = decode(record.value)
        except DecodeError as exc:
            log.warning("skipping an undecodable workflow record %s: %s", record.offset, exc)
            return
        run_id = event.stream_id[len(STREAM_PREFIX) :]
        tracked = self.runs.get(run_id)
        try:
            if tracked is None:
                if event.stream_version != 1:
                    return  # the rest of a run that finished before our committed offset
                self.runs[run_id] = _Tracked(evolve(None, event), tp, record.offset)
            else:
                evolve(tracked.state, event)
        except (WorkflowError, ValueError, KeyError) as exc:
            log.error("workflow run %s cannot be followed: %s", run_id, exc)
            self.runs.pop(run_id, None)
            return
        tracked = self.runs[run_id]
        if tracked.state.status != "running" and tracked.driver is None:
            self.runs.pop(run_id, None)

    def _drive_ready(self) -> None:
        for run_id, tracked in list(self.runs.items()):
            if tracked.driver is None and tracked.partition in self._ready:
                tracked.driver = asyncio.create_task(self._drive(run_id), name=f"run-{run_id}")

    async def _commit(self) -> None:
        consumer = self._consumer
        offsets = {}
        for tp in consumer.assignment():
            if tp not in self._ready:
                continue
            position = await consumer.position(tp)
            holding = [t.first_offset for t in self.runs.values() if t.partition == tp]
            offsets[tp] = min([position, *holding])
        if offsets:
            await consumer.commit(offsets)

    async def _drop_all(self, commit: bool = False) -> None:
        """Stop driving (the partitions move, or the runner stops): what is being appended
        lands first, so whoever drives the runs next reads it."""
        drivers = [t.driver for t in self.runs.values() if t.driver is not None]
        for driver in drivers:
            driver.cancel()
        await asyncio.gather(*drivers, return_exceptions=True)
        await asyncio.gather(*self._appending, return_exceptions=True)
        if commit and self._consumer is not None:
            with contextlib.suppress(Exception):
                await self._commit()
        self.runs.clear()
        self._ready.clear()

    # -- driving

    async def _drive(self, run_id: str) -> None:
        tracked = self.runs[run_id]
        state = tracked.state
        in_flight: dict[asyncio.Task[Any], StartStep] = {}
        try:
            while True:
                decisions = decide(state, frozenset(s.step for s in in_flight.values()))
                for decision in decisions:
                    if isinstance(decision, FinishRun):
                        await self._finish(state, decision)
                        self.runs.pop(run_id, None)
                        return
                    task = await self._act(state, decision)
                    if task is not None and isinstance(decision, StartStep):
                        in_flight[task] = decision
                if not in_flight:
                    if not decisions:
                        log.error("run %s is stuck: nothing to run, nothing running", run_id)
                        return
                    continue
                done, _ = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    start = in_flight.pop(task)
                    await self._append(state, self._outcome(state, start, task))
        finally:
            for task in in_flight:
                task.cancel()

    async def _act(
        self, state: RunState, decision: StartStep | SkipStep | FailStep
    ) -> asyncio.Task[Any] | None:
        about = _about(state, decision.step)
        match decision:
            case SkipStep():
                await self._append(state, WorkflowStepSkipped(**about, reason=decision.reason))
            case FailStep():
                failed = WorkflowStepFailed(
                    **about,
                    error_class=decision.error_class,
                    message=decision.message,
                    iteration=decision.iteration,
                )
                await self._append(state, failed)
            case StartStep():
                started = WorkflowStepStarted(
                    **about, iteration=decision.iteration, attempt=decision.attempt
                )
                await self._append(state, started)
                return asyncio.create_task(self._run_step(state, decision))
        return None

    async def _run_step(self, state: RunState, start: StartStep) -> tuple[float, Any]:
        step = next(s for s in state.spec.steps if s.id == start.step)
        action = self.actions.get(step.action)
        began = time.perf_counter()
        if action is None:
            known = ", ".join(sorted(self.actions))
            raise StepFailure("UnknownAction", f"no action {step.action!r} (actions: {known})")
        context = StepContext(
            run_id=state.run_id,
            workflow=state.spec.name,
            step=step.id,
            iteration=start.iteration,
            attempt=start.attempt,
            tenant_id=state.tenant_id,
            user_id=state.user_id,
            inputs=dict(state.inputs),
        )
        try:
            output = await asyncio.wait_for(action(start.params, context), step.timeout_s)
        except TimeoutError:
            raise StepFailure("Timeout", f"no result within {step.timeout_s} s") from None
        self.steps_run += 1
        return (time.perf_counter() - began) * 1000, output

    def _outcome(self, state: RunState, start: StartStep, task: asyncio.Task[Any]) -> Event:
        common: dict[str, Any] = {
            **_about(state, start.step), "iteration": start.iteration, "attempt": start.attempt
        }  # fmt: skip
        exc = task.exception()
        if exc is not None:
            error_class = exc.error_class if isinstance(exc, StepFailure) else type(exc).__name__
            return WorkflowStepFailed(**common, error_class=error_class, message=str(exc)[:2000])
        duration_ms, output = task.result()
        try:
            output = msgspec.to_builtins(output)
            size = len(msgspec.json.encode(output))
        except (TypeError, msgspec.EncodeError) as err:
            problem = ("OutputNotSerializable", str(err))
        else:
            if size <= self.settings.max_output_bytes:
                return WorkflowStepCompleted(**common, duration_ms=duration_ms, output=output)
            problem = ("OutputTooLarge", f"{size} bytes (limit {self.settings.max_output_bytes})")
        return WorkflowStepFailed(
            **common, error_class=problem[0], message=problem[1], duration_ms=duration_ms
        )

    async def _finish(self, state: RunState, finish: FinishRun) -> None:
        duration_ms = (self._clock.now() - state.started_at).total_seconds() * 1000
        await self._append(
            state,
            WorkflowFinished(
                run_id=state.run_id,
                workflow=state.spec.name,
                status=finish.status,
                duration_ms=max(duration_ms, 0.0),
                outputs=finish.outputs,
                error=finish.error,
            ),
        )
        self.finished += 1

    async def _append(self, state: RunState, payload: Event) -> None:
        """Append the run's next event and fold it in; a cancelled driver still lets the
        append land (the next owner of the run must read it)."""
        event: Envelope[Any] = next_event(
            state,
            payload,
            event_id=self._clock.new_event_id(),
            at=self._clock.now(),
            span_id=self._clock.new_span_id(),
        )

        async def land() -> None:
            await self.sink.append([event])
            evolve(state, event)

        task = asyncio.create_task(land())
        self._appending.add(task)
        task.add_done_callback(self._appending.discard)
        await asyncio.shield(task)
