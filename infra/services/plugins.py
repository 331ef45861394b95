"""Plugins: hook-based (pluggy), found by entry point and in a folder, hot-reloaded, isolated.

A plugin is a module that declares itself and implements some hooks:

    import msgspec
    from infra.services.plugins import hookimpl

    PLUGIN = {"name": "shout", "version": "1.0", "hooks": ["after_reply"]}

    class Config(msgspec.Struct):          # optional: the plugin's own config, validated
        suffix: str = "!"

    def init(context):                     # optional: context.config, context.emit, context.store
        global settings
        settings = context.config

    @hookimpl
    def after_reply(request, reply):       # return a new reply text, or None to keep it
        return reply.upper() + settings.suffix

    def cleanup():                         # optional
        ...

Hooks: `before_reply(request) -> str | None` (a new text for the user's message),
`after_reply(request, reply) -> str | None` (a new reply text), `on_event(event)`,
`run_step(params, step) -> output` (a workflow's `plugin` step).
A plugin that raises does not break the reply: the failure is a PluginFailed event, and
after `failure_limit` failures in a row its circuit breaker disables it (PluginDisabled).
Loading and reloading are events too (PluginLoaded, PluginReloaded).
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.metadata
import importlib.util
import logging
import sys
import types
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import msgspec
import pluggy

from events import Envelope, PluginChanged
from events.standalone import standalone
from infra.adapters.clock import SystemClock

log = logging.getLogger(__name__)

PROJECT = "chatllm"
ENTRY_POINT_GROUP = "chatllm.plugins"
HOOKS = ("before_reply", "after_reply", "on_event", "run_step")
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)
Change = Literal["loaded", "reloaded", "unloaded", "failed", "disabled"]


class _Specs:
    @hookspec
    def before_reply(self, request: PluginRequest) -> str | None:
        """A new text for the user's message, or None."""

    @hookspec
    def after_reply(self, request: PluginRequest, reply: str) -> str | None:
        """A new reply text, or None."""

    @hookspec
    def on_event(self, event: Envelope[Any]) -> None:
        """Every event of the log, as the bus delivers it."""

    @hookspec
    def run_step(self, params: dict[str, Any], step: Any) -> Any:
        """A workflow step's output (a `plugin` step naming this plugin)."""


@dataclass(frozen=True)
class PluginRequest:
    tenant_id: str
    user_id: str
    context_id: str
    message: str


@dataclass
class PluginContext:
    """What a plugin gets (injected, never imported): its config, the log, the store."""

    config: Any
    emit: Callable[[Any], Awaitable[Envelope[Any]]]
    store: Any


class PluginError(ValueError):
    """A plugin could not be loaded; the message says which and why."""


@dataclass
class Plugin:
    name: str
    version: str
    hooks: tuple[str, ...]
    module: types.ModuleType
    source: str
    """`file:<path>` or `entry point:<name>`."""
    digest: str = ""
    failures: dict[str, int] = field(default_factory=dict)
    """Failures in a row, per hook: a hook that always fails is not saved by another hook
    of the same plugin that succeeds."""
    disabled: bool = False


@dataclass
class PluginHost:
    """Loads, reloads and calls the plugins of one process. Long as a class: loading,
    reloading, each hook's call and its failure budget are its methods, each short."""

    folder: Path | None
    configs: dict[str, dict[str, Any]]
    record: Callable[[Envelope[Any]], Awaitable[None]]
    """Appends a plugin lifecycle event to the log."""
    tenant_id: str
    store: Any = None
    emit: Callable[[Any], Awaitable[Envelope[Any]]] | None = None
    failure_limit: int = 3
    entry_points: bool = True
    plugins: dict[str, Plugin] = field(default_factory=dict)
    _pm: pluggy.PluginManager = field(init=False)
    _clock: SystemClock = field(default_factory=SystemClock)

    def __post_init__(self) -> None:
        self._pm = pluggy.PluginManager(PROJECT)
        self._pm.add_hookspecs(_Specs)

    # ---- loading ----------------------------------------------------------------------

    async def load_all(self) -> None:
        if self.entry_points:
            for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
                try:
                    await self._install(ep.load(), f"entry point:{ep.name}", "")
                except Exception as exc:
                    await self._event(ep.name, "", "failed", f"cannot load: {exc!r}")
        await self.scan()

    async def scan(self) -> None:
        """Load new plugin files of the folder, reload changed ones, unload removed ones."""
        if self.folder is None or not self.folder.is_dir():
            return
        seen = set()
        for path in sorted(self.folder.glob("*.py")):
            seen.add(str(path))
            try:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            except OSError:
                continue
            current = next((p for p in self.plugins.values() if p.source == f"file:{path}"), None)
            if current is not None and current.digest == digest:
                continue
            try:
                module = _import_file(path, digest)
                await self._install(module, f"file:{path}", digest, replacing=current)
            except Exception as exc:
                await self._event(path.stem, "", "failed", f"cannot load {path.name}: {exc}")
        for plugin in list(self.plugins.values()):
            if plugin.source.startswith("file:") and plugin.source[5:] not in seen:
                self._uninstall(plugin)
                await self._event(plugin.name, plugin.version, "unloaded", "its file is gone")

    async def _install(
        self, module: types.ModuleType, source: str, digest: str, replacing: Plugin | None = None
    ) -> None:
        meta = getattr(module, "PLUGIN", None)
        if not isinstance(meta, dict) or not meta.get("name") or not meta.get("version"):
            raise PluginError(
                "a plugin declares PLUGIN = {'name': ..., 'version': ..., 'hooks': [...]}"
            )
        name, version = str(meta["name"]), str(meta["version"])
        hooks = tuple(meta.get("hooks", ()))
        unknown = sorted(set(hooks) - set(HOOKS))
        if unknown:
            raise PluginError(f"plugin {name}: unknown hooks {unknown}; known: {list(HOOKS)}")
        missing = [h for h in hooks if not callable(getattr(module, h, None))]
        if missing:
            raise PluginError(f"plugin {name}: declares hooks it does not implement: {missing}")
        config = self._config(name, module)
        context = PluginContext(config=config, emit=self._emit, store=self.store)
        old = replacing or self.plugins.get(name)
        if old is not None:
            self._uninstall(old)
        init = getattr(module, "init", None)
        if callable(init):
            init(context)  # lifecycle: init → execute (hooks) → cleanup
        self._pm.register(module, name=name)
        self.plugins[name] = Plugin(name, version, hooks, module, source, digest)
        kind: Change = "reloaded" if old is not None else "loaded"
        await self._event(name, version, kind, source)

    def _config(self, name: str, module: types.ModuleType) -> Any:
        raw = self.configs.get(name, {})
        schema = getattr(module, "Config", None)
        if schema is None:
            return raw
        try:
            return msgspec.convert(raw, schema)
        except msgspec.ValidationError as exc:
            raise PluginError(f"plugin {name}: invalid config: {exc}") from None

    def _uninstall(self, plugin: Plugin) -> None:
        cleanup = getattr(plugin.module, "cleanup", None)
        if callable(cleanup):
            try:
                cleanup()
            except Exception:
                log.exception("plugin %s: cleanup failed", plugin.name)
        if self._pm.is_registered(plugin.module):
            self._pm.unregister(plugin.module)
        self.plugins.pop(plugin.name, None)

    async def reconfigure(
        self, configs: dict[str, dict[str, Any]], failure_limit: int
    ) -> dict[str, str]:
        """New plugin config: each plugin whose config changed is initialised again with it
        (a config its Config refuses leaves the plugin as it was, and is a failed event).
        Returns the plugins that refused their new config, with why."""
        old, self.configs, self.failure_limit = self.configs, configs, failure_limit
        refused: dict[str, str] = {}
        for plugin in list(self.plugins.values()):
            if old.get(plugin.name) != configs.get(plugin.name):
                try:
                    await self._install(plugin.module, plugin.source, plugin.digest, plugin)
                except Exception as exc:
                    refused[plugin.name] = str(exc)
                    await self._event(plugin.name, plugin.version, "failed", f"new config: {exc}")
        return refused

    async def close(self) -> None:
        for plugin in list(self.plugins.values()):
            self._uninstall(plugin)

    # ---- calling ----------------------------------------------------------------------

    async def before_reply(self, request: PluginRequest) -> str:
        message = request.message
        for plugin, fn in self._impls("before_reply"):
            result = await self._call(
                plugin,
                fn,
                "before_reply",
                request=PluginRequest(
                    request.tenant_id, request.user_id, request.context_id, message
                ),
            )
            if isinstance(result, str):
                message = result
        return message

    async def after_reply(self, request: PluginRequest, reply: str) -> tuple[str, list[str]]:
        """The reply after every plugin's after_reply, and which plugins changed it."""
        changed_by = []
        for plugin, fn in self._impls("after_reply"):
            result = await self._call(plugin, fn, "after_reply", request=request, reply=reply)
            if isinstance(result, str) and result != reply:
                reply = result
                changed_by.append(plugin.name)
        return reply, changed_by

    async def on_event(self, event: Envelope[Any]) -> None:
        if isinstance(event.payload, PluginChanged):
            return  # a plugin never hears about plugins (no feedback loops)
        for plugin, fn in self._impls("on_event"):
            await self._call(plugin, fn, "on_event", event=event)

    async def run_step(self, plugin: str, params: dict[str, Any], step: Any) -> Any:
        """A workflow step run by one plugin; its failure fails the step (and counts
        towards the plugin's breaker)."""
        found = self.plugins.get(plugin)
        if found is None or "run_step" not in found.hooks:
            known = [p.name for p in self.plugins.values() if "run_step" in p.hooks]
            raise LookupError(f"no plugin {plugin!r} with a run_step hook (found: {known})")
        if found.disabled:
            raise RuntimeError(f"plugin {plugin!r} is disabled (its breaker opened)")
        return await self._call(
            found, found.module.run_step, "run_step", reraise=True, params=params, step=step
        )

    def _impls(self, hook: str) -> list[tuple[Plugin, Callable[..., Any]]]:
        found = []
        for impl in getattr(self._pm.hook, hook).get_hookimpls():
            plugin = self.plugins.get(impl.plugin_name)
            if plugin is not None and not plugin.disabled:
                found.append((plugin, impl.function))
        return found

    async def _call(
        self,
        plugin: Plugin,
        fn: Callable[..., Any],
        hook: str,
        reraise: bool = False,
        **kwargs: Any,
    ) -> Any:
        """One plugin's hook, isolated: its failure is an event, and after `failure_limit`
        failures in a row of one hook its breaker opens and the plugin is disabled."""
        try:
            result = fn(**kwargs)
            if asyncio.iscoroutine(result):
                result = await result
        except Exception as exc:
            failures = plugin.failures[hook] = plugin.failures.get(hook, 0) + 1
            await self._event(
                plugin.name, plugin.version, "failed", f"{hook}: {type(exc).__name__}: {exc}"
            )
            if failures >= self.failure_limit:
                plugin.disabled = True
                await self._event(
                    plugin.name,
                    plugin.version,
                    "disabled",
                    f"{hook} failed {failures} times in a row (its breaker opened)",
                )
            if reraise:
                raise
            return None
        plugin.failures[hook] = 0
        return result

    async def _emit(self, payload: Any) -> Envelope[Any]:
        if self.emit is None:
            raise RuntimeError("this plugin host cannot emit events")
        return await self.emit(payload)

    async def _event(self, name: str, version: str, change: Change, detail: str) -> None:
        log.info("plugin %s %s: %s (%s)", name, version, change, detail)
        event = standalone(
            PluginChanged(plugin=name, version=version, change=change, detail=detail[:2000]),
            event_id=self._clock.new_event_id(),
            tenant_id=self.tenant_id,
            user_id="plugins",
            occurred_at=datetime.now(UTC),
            stream="plugin",
        )
        try:
            await self.record(event)
        except Exception:
            log.exception("could not record the plugin event %s %s", name, change)


def _import_file(path: Path, digest: str) -> types.ModuleType:
    """Import a plugin file as a fresh module (a new name per content: a reload)."""
    name = f"chatllm_plugin_{path.stem}_{digest[:12]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module
