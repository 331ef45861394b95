"""Plugins in the running service: loaded from its plugins folder, edited while it runs
(picked up without a restart), hearing events, and never breaking a reply."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import Service, start_service, stop_service, wait_for
from tests.integration.test_plugins import BROKEN, SHOUT

pytestmark = pytest.mark.e2e

LISTENER = """
from pathlib import Path
from infra.services.plugins import hookimpl

PLUGIN = {"name": "listener", "version": "1", "hooks": ["on_event"]}
SEEN = Path(__file__).with_suffix(".seen")


@hookimpl
def on_event(event):
    with SEEN.open("a") as f:
        f.write(event.type + "\\n")
"""


@pytest.fixture(scope="module")
def plugged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    workdir = tmp_path_factory.mktemp("plugins")
    folder = workdir / "plugins"
    folder.mkdir()
    (folder / "shout.py").write_text(SHOUT.replace("VERSION", "1.0"))
    running = start_service(
        workdir,
        extra_env={
            "CHATLLM_PLUGINS__FOLDER": str(folder),
            "CHATLLM_PLUGINS__RELOAD_INTERVAL_S": "0.2",
            "CHATLLM_PLUGINS__FAILURE_LIMIT": "2",
        },
    )
    running.env["TEST_PLUGINS"] = str(folder)
    try:
        yield running
    finally:
        stop_service(running)


def ask(service: Service, text: str) -> str:
    response = httpx.post(
        f"{service.base}/v1/contexts/plug-1/messages", json={"content": text}, timeout=30
    )
    assert response.status_code == 200, response.text
    reply: str = response.json()["reply"]
    return reply


def plugin_events(service: Service) -> list[tuple[str, str]]:
    found = httpx.get(f"{service.base}/v1/events", params={"type": "PluginChanged"}).json()
    return [(e["event"]["payload"]["plugin"], e["event"]["payload"]["change"]) for e in found]


def test_a_folder_plugin_changes_replies_and_is_hot_reloaded(plugged: Service) -> None:
    folder = Path(plugged.env["TEST_PLUGINS"])
    reply = ask(plugged, "  hello there  ")
    assert reply == reply.upper() and reply.endswith("!")
    assert "“HELLO THERE”" in reply  # before_reply stripped the message the model saw
    (folder / "shout.py").write_text(
        SHOUT.replace("VERSION", "1.1").replace(
            "reply.upper() + settings.suffix", '"[" + reply + "]"'
        )
    )
    # What the user received is what the log says: the change is an event of the context.
    logged = httpx.get(f"{plugged.base}/v1/contexts/plug-1/events").json()
    rewrites = [e["event"]["payload"] for e in logged if e["type"] == "ReplyRewritten"]
    assert rewrites[-1]["content"] == reply and rewrites[-1]["plugins"] == ["shout"]
    replied = [e["event"]["payload"] for e in logged if e["type"] == "ReplyCompleted"]
    assert replied[-1]["message_id"] == rewrites[-1]["message_id"]
    wait_for(lambda: ask(plugged, "again").startswith("["), "the edited plugin")
    events = wait_for(
        lambda: ("shout", "reloaded") in plugin_events(plugged) and plugin_events(plugged),
        "the reload event",
    )
    assert ("shout", "loaded") in events


def test_a_broken_plugin_never_breaks_a_reply(plugged: Service) -> None:
    folder = Path(plugged.env["TEST_PLUGINS"])
    (folder / "broken.py").write_text(BROKEN)
    wait_for(lambda: ("broken", "loaded") in plugin_events(plugged), "the broken plugin")
    for _ in range(3):
        assert ask(plugged, "still answered")  # 200 with a reply, every time
    events = wait_for(
        lambda: ("broken", "disabled") in plugin_events(plugged) and plugin_events(plugged),
        "the breaker to disable it",
    )
    assert events.count(("broken", "failed")) == 2
    (folder / "broken.py").unlink()


def test_an_on_event_plugin_hears_the_log(plugged: Service) -> None:
    folder = Path(plugged.env["TEST_PLUGINS"])
    (folder / "listener.py").write_text(LISTENER)
    wait_for(lambda: ("listener", "loaded") in plugin_events(plugged), "the listener")
    seen = folder / "listener.seen"

    def heard() -> bool:
        ask(plugged, "anyone listening?")
        return seen.exists() and "ReplyCompleted" in seen.read_text()

    wait_for(heard, "the listener to hear a reply", timeout_s=60)
