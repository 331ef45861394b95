"""Workflows: named steps with dependencies, conditions and bounded loops.

A run is a stream of its own (`workflow:<run_id>`): `evolve` folds its events into a
RunState and `decide` says what to do next, so a run that a dead worker left behind is
resumed by folding its events again; no completed step runs twice. Expressions (`when`,
`until`, `${...}` in params) are evaluated with simpleeval over earlier results only.
"""

from __future__ import annotations

import graphlib
import hashlib
import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from simpleeval import SimpleEval

from events import (
    CURRENT_SCHEMA,
    Envelope,
    Event,
    WorkflowFinished,
    WorkflowStarted,
    WorkflowStepCompleted,
    WorkflowStepFailed,
    WorkflowStepSkipped,
    WorkflowStepStarted,
)
from events.chain import event_hash

STREAM_PREFIX = "workflow:"
MAX_ITERATIONS = 100
"""The ceiling of any loop: a loop is always bounded."""
Name = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=64)]
"""Step and input names are identifiers, so expressions can say `steps.classify.output`."""
WorkflowName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$", max_length=64)]
_TEMPLATE = re.compile(r"\$\{([^}]+)\}")
_FUNCTIONS = {
    "len": len,
    "int": int,
    "float": float,
    "str": str,
    "bool": bool,
    "min": min,
    "max": max,
    "abs": abs,
    "round": round,
    "sum": sum,
    "any": any,
    "all": all,
    "sorted": sorted,
}


class WorkflowError(ValueError):
    """A definition or a run's inputs are invalid; the message says which part and why."""


class Loop(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Repeat the step until `until` holds (with `output` and `iteration` of the latest
    run), at most `max_iterations` times."""

    max_iterations: Annotated[int, msgspec.Meta(ge=1, le=MAX_ITERATIONS)]
    until: str = ""


class Step(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One step: an action with its params, run once its dependencies have settled."""

    id: Name
    action: Annotated[str, msgspec.Meta(min_length=1)]
    """chat, kb, http, plugin, python (see docs: the README's workflow guide)."""
    params: dict[str, Any] = msgspec.field(default_factory=dict)
    depends: list[Name] = msgspec.field(default_factory=list)
    when: str = ""
    """Run only when this expression holds; otherwise the step is skipped."""
    loop: Loop | None = None
    retries: Annotated[int, msgspec.Meta(ge=0, le=10)] = 0
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 60.0


class InputSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One input a run takes: the workflow's own config schema."""

    type: Literal["str", "int", "float", "bool", "list", "dict"] = "str"
    required: bool = True
    default: Any = None
    description: str = ""


class WorkflowSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A named set of steps; `validate` checks it as a whole."""

    name: WorkflowName
    steps: list[Step]
    description: str = ""
    version: str = "1"
    inputs: dict[Name, InputSpec] = msgspec.field(default_factory=dict)


_INPUT_TYPES: dict[str, type | tuple[type, ...]] = {
    "str": str,
    "int": int,
    "float": (int, float),
    "bool": bool,
    "list": list,
    "dict": dict,
}


def parse_spec(data: Mapping[str, Any], source: str = "definition") -> WorkflowSpec:
    """A validated WorkflowSpec from plain data (a TOML/YAML document, or the builtins of a
    WorkflowStarted event); WorkflowError names what is wrong."""
    try:
        spec = msgspec.convert(dict(data), WorkflowSpec)
    except msgspec.ValidationError as exc:
        raise WorkflowError(f"{source}: {exc}") from None
    validate(spec, source)
    return spec


def validate(spec: WorkflowSpec, source: str = "definition") -> None:
    """Unique step ids, known dependencies, no cycle, expressions that parse."""
    where = f"{source}: workflow {spec.name!r}"
    if not spec.steps:
        raise WorkflowError(f"{where} has no steps")
    ids = [s.id for s in spec.steps]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise WorkflowError(f"{where}: step ids must be unique ({', '.join(duplicates)})")
    for step in spec.steps:
        unknown = [d for d in step.depends if d not in ids]
        if unknown:
            raise WorkflowError(
                f"{where}: step {step.id!r} depends on unknown step(s) {', '.join(unknown)}"
            )
        for label, expression in _expressions(step):
            try:
                _evaluator({}).parse(expression)
            except SyntaxError as exc:
                raise WorkflowError(
                    f"{where}: step {step.id!r} {label} {expression!r} is not an expression: "
                    f"{exc.msg}"
                ) from None
    try:
        order(spec)
    except graphlib.CycleError as exc:
        cycle = " -> ".join(exc.args[1])
        raise WorkflowError(f"{where}: dependencies form a cycle ({cycle})") from None


def _expressions(step: Step) -> Iterable[tuple[str, str]]:
    if step.when:
        yield "when", step.when
    if step.loop is not None and step.loop.until:
        yield "until", step.loop.until
    for text in _strings(step.params):
        for match in _TEMPLATE.finditer(text):
            yield "template", match.group(1)


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)


def order(spec: WorkflowSpec) -> list[str]:
    """The steps in an order that respects every dependency (the same for the same spec)."""
    sorter: graphlib.TopologicalSorter[str] = graphlib.TopologicalSorter()
    for step in spec.steps:
        sorter.add(step.id, *step.depends)
    return list(sorter.static_order())


def digest(spec: WorkflowSpec) -> str:
    """SHA-256 of the definition's canonical JSON: which version of a workflow a run ran."""
    return hashlib.sha256(msgspec.json.encode(spec, order="sorted")).hexdigest()


def check_inputs(spec: WorkflowSpec, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The run's inputs with defaults filled in; WorkflowError for an unknown, missing or
    mistyped one."""
    unknown = sorted(set(inputs) - set(spec.inputs))
    if unknown:
        known = ", ".join(sorted(spec.inputs)) or "none"
        raise WorkflowError(
            f"workflow {spec.name!r} takes no input(s) {', '.join(unknown)} (inputs: {known})"
        )
    resolved: dict[str, Any] = {}
    for name, field in spec.inputs.items():
        if name not in inputs:
            if field.required and field.default is None:
                raise WorkflowError(f"workflow {spec.name!r} needs input {name!r}")
            resolved[name] = field.default
            continue
        value = inputs[name]
        expected = _INPUT_TYPES[field.type]
        if not isinstance(value, expected) or (field.type != "bool" and isinstance(value, bool)):
            raise WorkflowError(
                f"workflow {spec.name!r}: input {name!r} must be {field.type}, "
                f"not {type(value).__name__}"
            )
        resolved[name] = value
    return resolved


# ---- evaluation -----------------------------------------------------------------


class ExpressionError(Exception):
    """An expression could not be evaluated over the run's results."""


def _evaluator(names: Mapping[str, Any]) -> SimpleEval:
    return SimpleEval(names=dict(names), functions=_FUNCTIONS)


def evaluate(expression: str, names: Mapping[str, Any]) -> Any:
    """The value of an expression over `names`; ExpressionError says why it has none."""
    try:
        return _evaluator(names).eval(expression)
    except Exception as exc:  # simpleeval raises many kinds, all of them the expression's fault
        raise ExpressionError(f"{expression!r}: {exc}") from None


def render(value: Any, names: Mapping[str, Any]) -> Any:
    """Params with every `${expr}` replaced; a string that is one whole `${expr}` becomes
    the expression's value (keeping its type)."""
    if isinstance(value, str):
        whole = _TEMPLATE.fullmatch(value)
        if whole:
            return evaluate(whole.group(1), names)
        return _TEMPLATE.sub(lambda m: str(evaluate(m.group(1), names)), value)
    if isinstance(value, Mapping):
        return {k: render(v, names) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [render(v, names) for v in value]
    return value


# ---- state ------------------------------------------------------------------------

StepStatus = Literal["pending", "running", "looping", "retrying", "completed", "skipped", "failed"]
SETTLED = frozenset({"completed", "skipped"})


class StepState(msgspec.Struct, kw_only=True):
    status: StepStatus = "pending"
    iteration: int = 0
    """The iteration last started (1-based)."""
    attempt: int = 0
    outputs: list[Any] = msgspec.field(default_factory=list)
    """One output per completed iteration."""
    duration_ms: float = 0.0
    error: str = ""
    reason: str = ""

    @property
    def output(self) -> Any:
        return self.outputs[-1] if self.outputs else None


class RunState(msgspec.Struct, kw_only=True):
    """A run as its events tell it."""

    run_id: str
    spec: WorkflowSpec
    inputs: dict[str, Any]
    tenant_id: str
    user_id: str
    started_at: datetime
    digest: str = ""
    trace_id: str = ""
    started_by: str = ""
    """The WorkflowStarted event's id: what every later event of the run was caused by."""
    version: int = 0
    last_hash: str = ""
    status: Literal["running", "completed", "failed"] = "running"
    steps: dict[str, StepState] = msgspec.field(default_factory=dict)
    finished_at: datetime | None = None
    error: str = ""

    @property
    def stream_id(self) -> str:
        return STREAM_PREFIX + self.run_id

    def names(self) -> dict[str, Any]:
        """What expressions see: inputs, every step's status and outputs, the run."""
        return {
            "inputs": dict(self.inputs),
            "steps": {
                step_id: {
                    "status": s.status,
                    "output": s.output,
                    "outputs": list(s.outputs),
                    "iterations": len(s.outputs),
                }
                for step_id, s in self.steps.items()
            },
            "run": {"id": self.run_id, "workflow": self.spec.name},
        }


def _step(spec: WorkflowSpec, step_id: str) -> Step:
    for step in spec.steps:
        if step.id == step_id:
            return step
    raise KeyError(step_id)


def evolve(state: RunState | None, event: Envelope[Any]) -> RunState:
    """The run after one of its events, updated in place (events of version <= state.version,
    seen before, are ignored)."""
    p = event.payload
    if state is None:
        if not isinstance(p, WorkflowStarted):
            raise ValueError(f"{event.stream_id} does not start with WorkflowStarted")
        spec = parse_spec(p.definition, f"run {p.run_id}")
        return RunState(
            run_id=p.run_id,
            spec=spec,
            inputs=dict(p.inputs),
            tenant_id=event.tenant_id,
            user_id=event.user_id,
            started_at=event.occurred_at,
            digest=p.digest,
            trace_id=event.trace_id,
            started_by=event.event_id,
            version=event.stream_version,
            last_hash=event_hash(event),
            steps={s.id: StepState() for s in spec.steps},
        )
    if event.stream_version <= state.version:
        return state
    state.version = event.stream_version
    state.last_hash = event_hash(event)
    match p:
        case WorkflowStepStarted():
            s = state.steps[p.step]
            s.status, s.iteration, s.attempt = "running", p.iteration, p.attempt
        case WorkflowStepCompleted():
            s = state.steps[p.step]
            s.outputs.append(p.output)
            s.duration_ms += p.duration_ms
            s.status = _after_iteration(state, _step(state.spec, p.step), s, p.iteration)
        case WorkflowStepFailed():
            s = state.steps[p.step]
            s.duration_ms += p.duration_ms
            s.error = f"{p.error_class}: {p.message}"
            retryable = p.error_class != "ExpressionError"
            s.status = (
                "retrying"
                if retryable and p.attempt <= _step(state.spec, p.step).retries
                else "failed"
            )
        case WorkflowStepSkipped():
            s = state.steps[p.step]
            s.status, s.reason = "skipped", p.reason
        case WorkflowFinished():
            state.status = p.status
            state.finished_at = event.occurred_at
            state.error = p.error
    return state


def _after_iteration(state: RunState, step: Step, s: StepState, iteration: int) -> StepStatus:
    if step.loop is None:
        return "completed"
    if iteration >= step.loop.max_iterations:
        return "completed"
    if not step.loop.until:
        return "looping"
    names = {**state.names(), "output": s.output, "iteration": iteration}
    try:
        done = bool(evaluate(step.loop.until, names))
    except ExpressionError as exc:
        s.error = f"ExpressionError: until {exc}"
        return "failed"
    return "completed" if done else "looping"


def fold(events: Iterable[Envelope[Any]]) -> RunState | None:
    """A run's state from its events in stream order (None for no events)."""
    state: RunState | None = None
    for event in events:
        state = evolve(state, event)
    return state


# ---- decide -----------------------------------------------------------------------


class StartStep(msgspec.Struct, frozen=True, kw_only=True):
    step: str
    iteration: int
    attempt: int
    params: dict[str, Any]
    """The step's params with templates rendered over the results so far."""


class SkipStep(msgspec.Struct, frozen=True, kw_only=True):
    step: str
    reason: str


class FailStep(msgspec.Struct, frozen=True, kw_only=True):
    step: str
    error_class: str
    message: str
    iteration: int = 1


class FinishRun(msgspec.Struct, frozen=True, kw_only=True):
    status: Literal["completed", "failed"]
    outputs: dict[str, Any]
    error: str = ""


Decision = StartStep | SkipStep | FailStep | FinishRun


def decide(state: RunState, in_flight: frozenset[str] = frozenset()) -> list[Decision]:
    """What to do next, given the steps whose actions are running in this process right
    now. A step the state shows as running that is not in flight was cut off by a dead
    worker: it is started again (its attempt counts up), never one that completed."""
    if state.status != "running":
        return []
    failed = [sid for sid, s in state.steps.items() if s.status == "failed"]
    if failed:
        if in_flight:
            return []  # let what runs settle, then finish
        errors = "; ".join(f"{sid}: {state.steps[sid].error}" for sid in failed)
        return [FinishRun(status="failed", outputs=_outputs(state), error=errors)]
    decisions: list[Decision] = []
    names = state.names()
    for step_id in order(state.spec):
        s = state.steps[step_id]
        if s.status in SETTLED or step_id in in_flight:
            continue
        step = _step(state.spec, step_id)
        if s.status in ("running", "retrying"):
            iteration, attempt = s.iteration, s.attempt + 1
        elif s.status == "looping":
            iteration, attempt = s.iteration + 1, 1
        else:  # pending
            if not all(state.steps[d].status in SETTLED for d in step.depends):
                continue
            if step.when:
                try:
                    holds = bool(evaluate(step.when, names))
                except ExpressionError as exc:
                    decisions.append(
                        FailStep(step=step_id, error_class="ExpressionError", message=f"when {exc}")
                    )
                    continue
                if not holds:
                    decisions.append(SkipStep(step=step_id, reason=f"when {step.when!r} is false"))
                    continue
            iteration, attempt = 1, 1
        iteration_names = {**names, "iteration": iteration}
        try:
            params = render(step.params, iteration_names)
        except ExpressionError as exc:
            decisions.append(
                FailStep(
                    step=step_id,
                    error_class="ExpressionError",
                    message=f"params {exc}",
                    iteration=iteration,
                )
            )
            continue
        decisions.append(
            StartStep(step=step_id, iteration=iteration, attempt=attempt, params=params)
        )
    if not decisions and not in_flight and all(s.status in SETTLED for s in state.steps.values()):
        return [FinishRun(status="completed", outputs=_outputs(state))]
    return decisions


def _outputs(state: RunState) -> dict[str, Any]:
    return {sid: s.output for sid, s in state.steps.items() if s.status == "completed"}


def summary(state: RunState) -> dict[str, Any]:
    """The run as the API and the CLI show it."""
    return {
        "run_id": state.run_id,
        "workflow": state.spec.name,
        "digest": state.digest,
        "status": state.status,
        "started_at": state.started_at.isoformat(),
        "finished_at": state.finished_at.isoformat() if state.finished_at else None,
        "inputs": state.inputs,
        "error": state.error,
        "version": state.version,
        "steps": [
            {
                "step": sid,
                "status": state.steps[sid].status,
                "iterations": len(state.steps[sid].outputs),
                "attempts": state.steps[sid].attempt,
                "duration_ms": round(state.steps[sid].duration_ms, 3),
                "output": state.steps[sid].output,
                "error": state.steps[sid].error,
                "reason": state.steps[sid].reason,
            }
            for sid in order(state.spec)
        ],
    }


def next_event(
    state: RunState, payload: Event, *, event_id: str, at: datetime, span_id: str
) -> Envelope[Any]:
    """`payload` as the run's next event: the next gapless version, chained to the last."""
    return Envelope(
        event_id=event_id,
        type=type(payload).__name__,
        schema=CURRENT_SCHEMA[type(payload)],
        occurred_at=at,
        stream_id=state.stream_id,
        stream_version=state.version + 1,
        tenant_id=state.tenant_id,
        user_id=state.user_id,
        trace_id=state.trace_id,
        span_id=span_id,
        correlation_id=state.run_id,
        causation_id=state.started_by,
        prev_hash=state.last_hash,
        payload=payload,
    )


def started(
    spec: WorkflowSpec,
    inputs: Mapping[str, Any],
    *,
    run_id: str,
    tenant_id: str,
    user_id: str,
    at: datetime,
    trace_id: str,
    span_id: str,
) -> Envelope[Any]:
    """The first event of a new run of `spec` (inputs checked against its schema)."""
    payload = WorkflowStarted(
        run_id=run_id,
        workflow=spec.name,
        digest=digest(spec),
        definition=msgspec.to_builtins(spec),
        inputs=check_inputs(spec, inputs),
        requested_by=user_id,
    )
    return Envelope(
        event_id=run_id,
        type=type(payload).__name__,
        schema=CURRENT_SCHEMA[type(payload)],
        occurred_at=at,
        stream_id=STREAM_PREFIX + run_id,
        stream_version=1,
        tenant_id=tenant_id,
        user_id=user_id,
        trace_id=trace_id,
        span_id=span_id,
        correlation_id=run_id,
        payload=payload,
    )
