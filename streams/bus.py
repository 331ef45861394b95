"""The event bus's dispatch (pure): which handlers an event reaches, in which order, and
what a failing handler does to the others (nothing: it is isolated and reported).

Subscriptions match an event type exactly or by a glob pattern (`Reply*`, `*`), optionally
narrowed by a filter; handlers run by descending priority, then in subscription order.
Handlers may be plain or async functions.
"""

from __future__ import annotations

import fnmatch
import inspect
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from events import Envelope

Handler = Callable[[Envelope[Any]], Awaitable[None] | None]
Filter = Callable[[Envelope[Any]], bool]


@dataclass(frozen=True)
class Subscription:
    pattern: str
    handler: Handler
    priority: int = 0
    filter: Filter | None = None
    order: int = 0

    def matches(self, event: Envelope[Any]) -> bool:
        if not fnmatch.fnmatchcase(event.type, self.pattern):
            return False
        return self.filter is None or bool(self.filter(event))


@dataclass(frozen=True)
class HandlerFailure:
    event_id: str
    event_type: str
    handler: str
    error: str


@dataclass
class Dispatcher:
    subscriptions: list[Subscription] = field(default_factory=list)
    _order: Any = field(default_factory=itertools.count)

    def on(
        self, pattern: str, handler: Handler, *, priority: int = 0, filter: Filter | None = None
    ) -> Subscription:
        """Subscribe `handler` to events whose type matches `pattern` (and `filter`)."""
        if not pattern:
            raise ValueError("a subscription needs an event type or a pattern (e.g. 'Reply*')")
        sub = Subscription(pattern, handler, priority, filter, next(self._order))
        self.subscriptions.append(sub)
        self.subscriptions.sort(key=lambda s: (-s.priority, s.order))
        return sub

    def off(self, subscription: Subscription) -> None:
        self.subscriptions.remove(subscription)

    async def dispatch(self, event: Envelope[Any]) -> list[HandlerFailure]:
        """Run every matching handler; a handler that raises is reported, and the others
        still run."""
        failures = []
        for sub in list(self.subscriptions):
            try:
                if not sub.matches(event):
                    continue
                result = sub.handler(event)
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:  # isolation: one handler never breaks another
                failures.append(
                    HandlerFailure(
                        event.event_id,
                        event.type,
                        getattr(sub.handler, "__qualname__", repr(sub.handler)),
                        f"{type(exc).__name__}: {exc}",
                    )
                )
        return failures
