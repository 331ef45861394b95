"""Plugins as the README tells users to write them: from a folder and from an entry point,
edited while loaded (hot reload), and a plugin that raises never breaks a reply."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest

from infra.services.plugins import PluginHost, PluginRequest

pytestmark = pytest.mark.integration

# The plugin the README shows users (its version made a placeholder, to edit it in tests).
_README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
SHOUT = next(
    block
    for block in re.findall(r"```python\n(.*?)```", _README, flags=re.S)
    if "PLUGIN = " in block
).replace('"version": "1.0"', '"version": "VERSION"')
assert "VERSION" in SHOUT

BROKEN = """
from infra.services.plugins import hookimpl

PLUGIN = {"name": "broken", "version": "0.1", "hooks": ["after_reply"]}


@hookimpl
def after_reply(request, reply):
    raise RuntimeError("plugin bug")
"""

REQUEST = PluginRequest(tenant_id="t1", user_id="u1", context_id="c1", message="  hi  ")


def host(folder: Path | None, events: list[Any], **kw: Any) -> PluginHost:
    async def record(event: Any) -> None:
        events.append(event.payload)

    return PluginHost(
        folder=folder,
        configs=kw.pop("configs", {}),
        record=record,
        tenant_id="ops",
        entry_points=kw.pop("entry_points", False),
        **kw,
    )


def changes(events: list[Any]) -> list[tuple[str, str]]:
    return [(e.plugin, e.change) for e in events]


async def test_a_folder_plugin_is_loaded_configured_and_reloaded(tmp_path: Path) -> None:
    (tmp_path / "shout.py").write_text(SHOUT.replace("VERSION", "1.0"))
    events: list[Any] = []
    plugins = host(tmp_path, events, configs={"shout": {"suffix": "?!"}})
    await plugins.load_all()
    assert changes(events) == [("shout", "loaded")]
    assert await plugins.before_reply(REQUEST) == "hi"
    assert (await plugins.after_reply(REQUEST, "lisbon"))[0] == "LISBON?!"

    # Edited while loaded: picked up at the next scan, recorded as a reload.
    (tmp_path / "shout.py").write_text(
        SHOUT.replace("VERSION", "1.1").replace("reply.upper()", "reply.title()")
    )
    await plugins.scan()
    assert changes(events)[-1] == ("shout", "reloaded")
    assert plugins.plugins["shout"].version == "1.1"
    assert (await plugins.after_reply(REQUEST, "lisbon"))[0] == "Lisbon?!"
    (tmp_path / "shout.py").unlink()
    await plugins.scan()
    assert changes(events)[-1] == ("shout", "unloaded")
    assert (await plugins.after_reply(REQUEST, "lisbon"))[0] == "lisbon"


async def test_new_config_is_validated_by_the_plugin_and_applied_without_a_restart(
    tmp_path: Path,
) -> None:
    (tmp_path / "shout.py").write_text(SHOUT.replace("VERSION", "1.0"))
    events: list[Any] = []
    plugins = host(tmp_path, events)
    await plugins.load_all()
    # A config its Config refuses: a failed event, and the plugin goes on as it was.
    refused = await plugins.reconfigure({"shout": {"suffix": 3}}, failure_limit=3)
    assert list(refused) == ["shout"]  # what `config use` shows as refused, not applied
    assert changes(events)[-1] == ("shout", "failed")
    assert "new config" in events[-1].detail
    assert (await plugins.after_reply(REQUEST, "ok"))[0] == "OK!"
    # A valid one: the plugin is initialised again with it.
    assert await plugins.reconfigure({"shout": {"suffix": "?"}}, failure_limit=3) == {}
    assert changes(events)[-1] == ("shout", "reloaded")
    assert (await plugins.after_reply(REQUEST, "ok"))[0] == "OK?"


async def test_a_plugin_runs_a_workflow_step_and_its_failure_fails_the_step(
    tmp_path: Path,
) -> None:
    (tmp_path / "steps.py").write_text(
        "from infra.services.plugins import hookimpl\n"
        'PLUGIN = {"name": "steps", "version": "1", "hooks": ["run_step"]}\n'
        "@hookimpl\n"
        "def run_step(params, step):\n"
        "    return {'double': params['n'] * 2}\n"
    )
    events: list[Any] = []
    plugins = host(tmp_path, events)
    await plugins.load_all()
    assert await plugins.run_step("steps", {"n": 4}, None) == {"double": 8}
    with pytest.raises(KeyError):
        await plugins.run_step("steps", {}, None)
    assert changes(events)[-1] == ("steps", "failed")
    with pytest.raises(LookupError, match="no plugin 'other'"):
        await plugins.run_step("other", {}, None)


async def test_a_failing_plugin_is_isolated_then_disabled(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text(BROKEN)
    (tmp_path / "shout.py").write_text(SHOUT.replace("VERSION", "1.0"))
    events: list[Any] = []
    plugins = host(tmp_path, events, failure_limit=2)
    await plugins.load_all()
    for _ in range(3):  # the reply still goes out, shouted by the healthy plugin
        assert (await plugins.after_reply(REQUEST, "ok"))[0] == "OK!"
    assert changes(events).count(("broken", "failed")) == 2
    assert ("broken", "disabled") in changes(events)
    assert plugins.plugins["broken"].disabled


async def test_a_hook_that_always_fails_disables_the_plugin_though_another_succeeds(
    tmp_path: Path,
) -> None:
    (tmp_path / "half.py").write_text(
        "from infra.services.plugins import hookimpl\n"
        'PLUGIN = {"name": "half", "version": "1", "hooks": ["before_reply", "after_reply"]}\n'
        "@hookimpl\n"
        "def before_reply(request):\n"
        "    return request.message\n"
        "@hookimpl\n"
        "def after_reply(request, reply):\n"
        "    raise RuntimeError('always')\n"
    )
    events: list[Any] = []
    plugins = host(tmp_path, events, failure_limit=2)
    await plugins.load_all()
    for _ in range(2):  # before_reply succeeds each time; after_reply fails each time
        assert await plugins.before_reply(REQUEST) == REQUEST.message
        assert (await plugins.after_reply(REQUEST, "ok"))[0] == "ok"
    assert plugins.plugins["half"].disabled
    disabled = [e.detail for e in events if e.change == "disabled"]
    assert disabled == ["after_reply failed 2 times in a row (its breaker opened)"]


async def test_bad_plugins_are_refused_with_a_reason(tmp_path: Path) -> None:
    (tmp_path / "nameless.py").write_text("PLUGIN = {}\n")
    (tmp_path / "liar.py").write_text(
        'PLUGIN = {"name": "liar", "version": "1", "hooks": ["after_reply"]}\n'
    )
    (tmp_path / "shout.py").write_text(SHOUT.replace("VERSION", "1"))
    events: list[Any] = []
    plugins = host(tmp_path, events, configs={"shout": {"suffix": 3}})
    await plugins.load_all()
    details = {e.plugin: e.detail for e in events if e.change == "failed"}
    assert "declares PLUGIN" in details["nameless"]
    assert "does not implement" in details["liar"]
    assert "invalid config" in details["shout"]
    assert plugins.plugins == {}


async def test_an_installed_plugin_is_found_by_its_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "acme_shout.py").write_text(SHOUT.replace("VERSION", "2.0"))
    dist = tmp_path / "acme_shout-2.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-shout\nVersion: 2.0\n")
    (dist / "entry_points.txt").write_text("[chatllm.plugins]\nshout = acme_shout\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    events: list[Any] = []
    plugins = host(None, events, entry_points=True)
    await plugins.load_all()
    assert ("shout", "loaded") in changes(events)
    assert plugins.plugins["shout"].source == "entry point:shout"
    assert (await plugins.after_reply(REQUEST, "x"))[0] == "X!"
    sys.modules.pop("acme_shout", None)
