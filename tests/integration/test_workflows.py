"""Workflow runs on the real broker: a diamond with a condition and a loop runs in order;
the README's Python workflow runs (with a real HTTP step); a SIGKILLed worker's run is
finished by the next worker without repeating a completed step; files load and fail
with reasons."""

from __future__ import annotations

import asyncio
import http.server
import json
import re
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from actors.workflow import WorkflowSpec, parse_spec
from events import Envelope
from infra.adapters.clickhouse.store import AsyncStore, ClickHouseStore
from infra.adapters.kafka.broker import EmbeddedBroker
from infra.adapters.kafka.clients import KafkaEventSink, KafkaStreamReader
from infra.config import BrokerConfig
from infra.services.workflows import (
    ArchivedDocuments,
    Catalog,
    RunnerSettings,
    StepContext,
    WorkflowRunner,
    builtin_actions,
    start_run,
)
from tests.conftest import Topics
from tests.faults.test_worker_crash import WorkerProcess, worker_env

pytestmark = pytest.mark.integration

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
WORDCOUNT = next(b for b in re.findall(r"```python\n(.*?)```", README, re.S) if "WORKFLOW" in b)
TRIAGE = next(b for b in re.findall(r"```toml\n(.*?)```", README, re.S) if "[[steps]]" in b)

CALLS: list[tuple[str, int]] = []


def record(params: dict[str, Any], step: StepContext) -> Any:
    CALLS.append((step.step, step.iteration))
    return params.get("value")


DIAMOND = {
    "name": "diamond",
    "inputs": {"n": {"type": "int"}, "lang": {"type": "str", "default": "en"}},
    "steps": [
        {"id": "fetch", "action": "python",
         "params": {"function": f"{__name__}:record", "value": "${inputs.n}"}},
        {"id": "left", "action": "python", "depends": ["fetch"],
         "params": {"function": f"{__name__}:record", "value": "${steps.fetch.output * 10}"}},
        {"id": "right", "action": "python", "depends": ["fetch"], "when": "inputs.lang == 'fr'",
         "params": {"function": f"{__name__}:record", "value": "bonjour"}},
        {"id": "join", "action": "python", "depends": ["left", "right"],
         "loop": {"max_iterations": 10, "until": "output >= steps.fetch.output + 1"},
         "params": {"function": f"{__name__}:record", "value": "${iteration}"}},
    ],
}  # fmt: skip


async def finished_run(
    bootstrap: str, topic: str, run_id: str, timeout_s: float = 60
) -> list[Envelope[Any]]:
    """The run's events once its WorkflowFinished is on the log."""
    reader = KafkaStreamReader(bootstrap, topic)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        events = await reader.read_stream(f"workflow:{run_id}")
        if events and events[-1].type == "WorkflowFinished":
            return events
        await asyncio.sleep(0.2)
    raise AssertionError(f"run {run_id} did not finish: {[e.type for e in events]}")


@pytest.fixture
async def runner(
    broker: EmbeddedBroker, topics: Topics, store: ClickHouseStore
) -> AsyncIterator[tuple[WorkflowRunner, KafkaEventSink]]:
    sink = KafkaEventSink(broker.bootstrap_servers, topics.events, BrokerConfig())
    astore = AsyncStore(store)
    settings = RunnerSettings(
        bootstrap_servers=broker.bootstrap_servers,
        topic=topics.events,
        group=f"wf-{topics.events}",
        session_timeout_s=3.0,
        heartbeat_interval_s=0.5,
        rebalance_timeout_s=1.0,
    )
    actions = builtin_actions(knowledge=ArchivedDocuments(astore))
    try:
        async with WorkflowRunner(settings, sink, actions).running() as running:
            yield running, sink
    finally:
        await sink.stop()
        astore.close()


async def test_a_diamond_with_a_condition_and_a_loop_runs_in_dependency_order(
    runner: tuple[WorkflowRunner, KafkaEventSink], broker: EmbeddedBroker, topics: Topics
) -> None:
    _, sink = runner
    CALLS.clear()
    spec = parse_spec(DIAMOND)
    run_id = await start_run(sink, spec, {"n": 2}, tenant_id="acme", user_id="ann")
    events = await finished_run(broker.bootstrap_servers, topics.events, run_id)

    # Step 1: the functions ran in dependency order; the loop stopped when its output
    # reached n + 1; the branch whose condition failed did not run.
    assert CALLS == [("fetch", 1), ("left", 1), ("join", 1), ("join", 2), ("join", 3)]
    # Step 2: the event stream tells the same story, with gapless versions.
    assert [e.stream_version for e in events] == list(range(1, len(events) + 1))
    told = [(e.type.removeprefix("Workflow"), getattr(e.payload, "step", "")) for e in events]
    assert told[:3] == [("Started", ""), ("StepStarted", "fetch"), ("StepCompleted", "fetch")]
    assert ("StepSkipped", "right") in told
    first_join = told.index(("StepStarted", "join"))
    assert first_join > told.index(("StepCompleted", "left"))
    assert first_join > told.index(("StepSkipped", "right"))
    finished = events[-1].payload
    assert finished.status == "completed"
    assert finished.outputs == {"fetch": 2, "left": 20, "join": 3}
    assert all(e.causation_id == run_id for e in events[1:])


async def test_the_readme_python_workflow_runs_with_a_real_http_step(
    runner: tuple[WorkflowRunner, KafkaEventSink],
    broker: EmbeddedBroker,
    topics: Topics,
    tmp_path: Path,
    webhook: tuple[str, list[Any]],
) -> None:
    _, sink = runner
    (tmp_path / "wordcount.py").write_text(WORDCOUNT)
    catalog = Catalog(folder=tmp_path)
    spec = catalog.get("wordcount")
    url, received = webhook
    text = "event sourcing keeps every change"
    run_id = await start_run(
        sink, spec, {"text": text, "webhook": url}, tenant_id="acme", user_id="ann"
    )
    events = await finished_run(broker.bootstrap_servers, topics.events, run_id)
    assert events[-1].payload.status == "completed", events[-1].payload.error
    assert events[-1].payload.outputs["longest"] == "sourcing"
    assert received == [{"longest": "sourcing"}]
    report = next(e.payload for e in events if getattr(e.payload, "step", "") == "report"
                  and e.type == "WorkflowStepCompleted")  # fmt: skip
    assert report.output["status"] == 200


async def test_a_failing_step_fails_the_run_with_its_reason(
    runner: tuple[WorkflowRunner, KafkaEventSink], broker: EmbeddedBroker, topics: Topics
) -> None:
    _, sink = runner
    spec = parse_spec({"name": "bad-url", "steps": [
        {"id": "call", "action": "http", "retries": 1, "params": {"url": "http://127.0.0.1:9/x"}},
        {"id": "after", "action": "python", "depends": ["call"],
         "params": {"function": f"{__name__}:record"}},
    ]})  # fmt: skip
    run_id = await start_run(sink, spec, {}, tenant_id="acme", user_id="ann")
    events = await finished_run(broker.bootstrap_servers, topics.events, run_id)
    failed = [e.payload for e in events if e.type == "WorkflowStepFailed"]
    assert [(f.step, f.attempt, f.error_class) for f in failed] == [
        ("call", 1, "HttpError"),
        ("call", 2, "HttpError"),
    ]
    assert events[-1].payload.status == "failed"
    assert "call: HttpError" in events[-1].payload.error
    assert not [e for e in events if getattr(e.payload, "step", "") == "after"]


def test_definitions_load_from_toml_yaml_and_python_and_bad_files_say_why(
    tmp_path: Path,
) -> None:
    import yaml

    (tmp_path / "triage.toml").write_text(TRIAGE)
    # The same workflow as YAML, under another name.
    import tomllib

    as_yaml = {**tomllib.loads(TRIAGE), "name": "triage-yaml"}
    (tmp_path / "triage.yaml").write_text(yaml.safe_dump(as_yaml))
    (tmp_path / "wordcount.py").write_text(WORDCOUNT)
    (tmp_path / "cycle.toml").write_text(
        'name = "cycle"\n[[steps]]\nid = "a"\naction = "chat"\ndepends = ["b"]\n'
        '[[steps]]\nid = "b"\naction = "chat"\ndepends = ["a"]\n'
    )
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    catalog = Catalog(folder=tmp_path)
    definitions = catalog.definitions()
    assert sorted(definitions) == ["triage", "triage-yaml", "wordcount"]
    assert definitions["triage"].spec == parse_spec({**as_yaml, "name": "triage"})
    assert "cycle" in catalog.errors[str(tmp_path / "cycle.toml")]
    assert "not valid YAML" in catalog.errors[str(tmp_path / "broken.yaml")]
    assert isinstance(catalog.get("wordcount"), WorkflowSpec)


# ---- a worker SIGKILLed mid-run ------------------------------------------------------

SLOW_WORKFLOW = """
import time
from pathlib import Path

from actors.workflow import WorkflowSpec
from infra.services.workflows import python_step

LOG = Path(__file__).with_suffix(".log")


def note(params, step):
    with LOG.open("a") as f:
        f.write(f"{step.step} {step.attempt}\\n")
    if params.get("sleep"):
        time.sleep(params["sleep"])
    return step.step


WORKFLOW = WorkflowSpec(
    name="slow",
    steps=[
        python_step("first", note),
        python_step("second", note, depends=["first"], params={"sleep": 4}),
        python_step("third", note, depends=["second"]),
    ],
)
"""


def test_a_sigkilled_worker_run_is_finished_by_the_next_without_repeats(
    broker: EmbeddedBroker, topics: Topics, tmp_path: Path
) -> None:
    folder = tmp_path / "workflows"
    folder.mkdir()
    (folder / "slow.py").write_text(SLOW_WORKFLOW)
    steps_log = folder / "slow.log"
    env = worker_env(
        broker,
        topics,
        tmp_path,
        streams__commit_interval_s="0.5",
        workflows__folder=str(folder),
        anomalies__enabled="false",
    )
    spec = Catalog(folder=folder).get("slow")

    async def start() -> str:
        sink = KafkaEventSink(broker.bootstrap_servers, topics.events, BrokerConfig())
        try:
            return await start_run(sink, spec, {}, tenant_id="acme", user_id="ann")
        finally:
            await sink.stop()

    run_id = asyncio.run(start())

    # Step 1: the first worker completes `first`, starts the slow `second`, and is
    # SIGKILLed in the middle of it.
    first = WorkerProcess(env)
    first.wait_for(lambda: steps_log.exists() and "second 1" in steps_log.read_text(), 90)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()

    # Step 2: a new worker reads the run back and finishes it.
    second = WorkerProcess(env)
    try:
        events = asyncio.run(finished_run(broker.bootstrap_servers, topics.events, run_id, 120))
    finally:
        second.proc.send_signal(signal.SIGTERM)
        second.proc.wait(60)

    # Step 3: `first` ran once; `second` was cut off and ran again as attempt 2; the run
    # completed, and its stream is gapless.
    assert steps_log.read_text().split("\n")[:-1] == ["first 1", "second 1", "second 2", "third 1"]
    told = [
        (e.type.removeprefix("Workflow"), getattr(e.payload, "step", ""),
         getattr(e.payload, "attempt", 0))
        for e in events
    ]  # fmt: skip
    assert told == [
        ("Started", "", 0),
        ("StepStarted", "first", 1),
        ("StepCompleted", "first", 1),
        ("StepStarted", "second", 1),
        ("StepStarted", "second", 2),
        ("StepCompleted", "second", 2),
        ("StepStarted", "third", 1),
        ("StepCompleted", "third", 1),
        ("Finished", "", 0),
    ]
    assert [e.stream_version for e in events] == list(range(1, len(events) + 1))


# ---- a local webhook ---------------------------------------------------------------


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[Any]]]:
    received: list[Any] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append(json.loads(body))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"ok": true}')

        def log_message(self, *args: Any) -> None:
            """Quiet: the test checks what it received instead."""

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    finally:
        server.shutdown()
