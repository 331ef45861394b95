"""The workflow core without I/O: validation, expressions, and decide/evolve over a run's
events, including a run cut off mid-step and resumed from its events alone."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest

from actors.workflow import (
    FailStep,
    FinishRun,
    RunState,
    SkipStep,
    StartStep,
    WorkflowError,
    check_inputs,
    decide,
    evolve,
    fold,
    next_event,
    parse_spec,
    render,
    started,
)
from events import (
    Envelope,
    WorkflowFinished,
    WorkflowStepCompleted,
    WorkflowStepFailed,
    WorkflowStepSkipped,
    WorkflowStepStarted,
    decode,
    encode,
)
from events.chain import verify_stream

AT = datetime(2026, 11, 25, 12, tzinfo=UTC)

DIAMOND = {
    "name": "diamond",
    "inputs": {"n": {"type": "int", "default": 2}, "lang": {"type": "str", "required": False}},
    "steps": [
        {"id": "fetch", "action": "echo", "params": {"value": "${inputs.n}"}},
        {"id": "left", "action": "echo", "depends": ["fetch"],
         "params": {"value": "${steps.fetch.output * 10}"}},
        {"id": "right", "action": "echo", "depends": ["fetch"], "when": "inputs.lang == 'fr'",
         "params": {"value": "bonjour"}},
        {"id": "join", "action": "echo", "depends": ["left", "right"],
         "params": {"value": "${iteration}"},
         "loop": {"max_iterations": 5, "until": "output >= steps.fetch.output + 1"}},
    ],
}  # fmt: skip


class Run:
    """Plays the runner: executes decisions with `echo` (output = params['value'])."""

    def __init__(self, definition: dict[str, Any], inputs: dict[str, Any]) -> None:
        spec = parse_spec(definition)
        self.events: list[Envelope[Any]] = [
            started(spec, inputs, run_id=_id(0), tenant_id="t", user_id="u", at=AT,
                    trace_id="a" * 32, span_id="b" * 16)
        ]  # fmt: skip
        self.state: RunState = evolve(None, self.events[0])
        self.executed: list[tuple[str, int]] = []

    def append(self, payload: Any) -> None:
        event = next_event(self.state, payload, event_id=_id(len(self.events)), at=AT,
                           span_id="c" * 16)  # fmt: skip
        # Through the codec, as the log would carry it.
        event = decode(encode(event))
        self.events.append(event)
        evolve(self.state, event)

    def step(self, decision: Any, fail: bool = False) -> None:
        step = getattr(decision, "step", "")
        common = {"run_id": self.state.run_id, "workflow": "diamond", "step": step}
        if isinstance(decision, SkipStep):
            self.append(WorkflowStepSkipped(**common, reason=decision.reason))
        elif isinstance(decision, FailStep):
            self.append(WorkflowStepFailed(**common, error_class=decision.error_class,
                                           message=decision.message))  # fmt: skip
        elif isinstance(decision, StartStep):
            at = {"iteration": decision.iteration, "attempt": decision.attempt}
            self.append(WorkflowStepStarted(**common, **at))
            if fail:
                self.append(WorkflowStepFailed(**common, **at, error_class="Boom", message="x"))
                return
            self.executed.append((decision.step, decision.iteration))
            output = decision.params["value"]
            self.append(WorkflowStepCompleted(**common, **at, duration_ms=1.0, output=output))
        elif isinstance(decision, FinishRun):
            finished = WorkflowFinished(
                run_id=self.state.run_id,
                workflow="diamond",
                status=decision.status,
                duration_ms=5.0,
                outputs=decision.outputs,
                error=decision.error,
            )
            self.append(finished)

    def until_finished(self) -> None:
        for _ in range(100):
            decisions = decide(self.state)
            if not decisions:
                return
            for decision in decisions:
                self.step(decision)


def _id(n: int) -> str:
    return f"01900000-0000-7000-8000-{n:012d}"


def test_diamond_with_condition_and_loop_runs_in_dependency_order() -> None:
    run = Run(DIAMOND, {"n": 2})
    run.until_finished()
    # fetch first; left and right (skipped: lang is not fr) only after it; the loop of
    # join runs until its output reaches n + 1 = 3, after both of its dependencies settled.
    assert run.executed == [("fetch", 1), ("left", 1), ("join", 1), ("join", 2), ("join", 3)]
    assert run.state.status == "completed"
    assert run.state.steps["right"].status == "skipped"
    assert run.state.steps["left"].output == 20
    assert run.state.steps["join"].outputs == [1, 2, 3]
    finished = run.events[-1].payload
    assert isinstance(finished, WorkflowFinished)
    assert finished.outputs == {"fetch": 2, "left": 20, "join": 3}
    # The run is a proper stream: gapless versions, each event chained to the one before.
    assert verify_stream(run.state.stream_id, [(e, None) for e in run.events]) == []


def test_condition_true_runs_the_branch_and_loops_stop_at_their_bound() -> None:
    definition = msgspec.json.decode(msgspec.json.encode(DIAMOND))
    definition["steps"][3]["loop"] = {"max_iterations": 2, "until": "False"}
    run = Run(definition, {"n": 1, "lang": "fr"})
    run.until_finished()
    assert ("right", 1) in run.executed
    assert run.state.steps["join"].outputs == [1, 2]  # bounded: stops at max_iterations


def test_a_run_cut_off_mid_step_resumes_without_repeating_completed_steps() -> None:
    run = Run(DIAMOND, {"n": 2})
    run.step(decide(run.state)[0])  # fetch completes
    left = next(d for d in decide(run.state) if d.step == "left")
    run.append(WorkflowStepStarted(run_id=run.state.run_id, workflow="diamond", step="left"))
    # The worker dies here. A new one folds the events and decides again.
    resumed = fold(run.events)
    assert resumed is not None
    decisions = decide(resumed)
    assert [d.step for d in decisions if isinstance(d, StartStep)] == ["left"]
    again = next(d for d in decisions if isinstance(d, StartStep))
    assert (again.iteration, again.attempt) == (1, 2)
    assert again.params == left.params
    # In the live runner a step in flight is not started twice.
    assert not [d for d in decide(resumed, frozenset({"left"})) if isinstance(d, StartStep)]


def test_retries_then_failure_finishes_the_run_as_failed() -> None:
    definition = {"name": "flaky", "steps": [{"id": "a", "action": "echo", "retries": 1}]}
    run = Run(definition, {})
    first = decide(run.state)[0]
    run.step(first, fail=True)
    second = decide(run.state)[0]
    assert isinstance(second, StartStep) and second.attempt == 2
    run.step(second, fail=True)
    [finish] = decide(run.state)
    assert isinstance(finish, FinishRun) and finish.status == "failed"
    assert "Boom" in finish.error


def test_a_condition_that_cannot_be_evaluated_fails_the_step_with_the_reason() -> None:
    definition = {"name": "bad", "steps": [{"id": "a", "action": "echo", "when": "steps.zz"}]}
    run = Run(definition, {})
    [fail] = decide(run.state)
    assert isinstance(fail, FailStep) and "zz" in fail.message


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"steps": []}, "has no steps"),
        ({"steps": [{"id": "a", "action": "x"}, {"id": "a", "action": "x"}]}, "unique"),
        ({"steps": [{"id": "a", "action": "x", "depends": ["b"]}]}, "unknown step"),
        (
            {"steps": [{"id": "a", "action": "x", "depends": ["b"]},
                       {"id": "b", "action": "x", "depends": ["a"]}]},
            "cycle",
        ),
        ({"steps": [{"id": "a", "action": "x", "when": "1 +"}]}, "not an expression"),
        ({"steps": [{"id": "a", "action": "x", "loop": {"max_iterations": 1000}}]}, "<= 100"),
        ({"steps": [{"id": "a", "action": "x", "colour": "red"}]}, "unknown field"),
    ],
)  # fmt: skip
def test_invalid_definitions_are_refused_with_the_reason(
    change: dict[str, Any], message: str
) -> None:
    with pytest.raises(WorkflowError, match=message):
        parse_spec({"name": "w", **change})


def test_inputs_are_checked_against_the_workflows_schema() -> None:
    spec = parse_spec(DIAMOND)
    assert check_inputs(spec, {}) == {"n": 2, "lang": None}
    with pytest.raises(WorkflowError, match="must be int"):
        check_inputs(spec, {"n": "two"})
    with pytest.raises(WorkflowError, match="takes no input"):
        check_inputs(spec, {"colour": 1})


def test_templates_keep_the_type_of_a_whole_expression() -> None:
    names = {"inputs": {"n": 3, "who": "ann"}}
    assert render({"a": "${inputs.n}", "b": "hi ${inputs.who}!", "c": ["${inputs.n * 2}"]},
                  names) == {"a": 3, "b": "hi ann!", "c": [6]}  # fmt: skip
