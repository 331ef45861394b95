"""Write leases: a stale second writer (a "zombie" shard that Ray replaced while its process
still ran) loses and writes nothing.

Kafka has no conditional append and tansu no transactions, so fencing happens before the
append: each shard incarnation holds a lease on its shard index from one registry (a Ray
named actor), renews it in the background, and refuses to append once it can no longer
prove it holds it. A new incarnation waits until its predecessor's lease has run out
before writing. The check is local (no round trip per turn). With real Kafka, the
transactional producer's epoch fencing is the stronger tool; see the README.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from actors.context import VersionConflict
from actors.ports import EventSink
from events import Envelope

log = logging.getLogger(__name__)

LEASE_REGISTRY = "chatllm-leases"
"""Name of the registry actor (a stable name)."""


class LeaseLost(VersionConflict):
    """This shard no longer holds its write lease: another incarnation took over."""


class LeaseRegistry:
    """Grants one write lease per shard index; a new holder gets a higher epoch."""

    def __init__(
        self,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
        restarted: bool | None = None,
    ) -> None:
        self._ttl = ttl_s
        self._clock = clock
        if restarted is None:
            restarted = _restarted_by_ray()
        # A registry Ray restarted does not know who held what: until a lease could have run
        # out, every newcomer waits. A fresh one knows nobody holds anything yet.
        self._born = clock() if restarted else clock() - ttl_s
        self._leases: dict[int, tuple[int, str, float]] = {}  # index -> (epoch, holder, until)
        self._epochs: dict[int, int] = {}

    def acquire(self, index: int, holder: str) -> tuple[int, float]:
        """(epoch, seconds to wait before writing): until the previous lease has run out."""
        now = self._clock()
        previous = self._leases.get(index)
        until = previous[2] if previous is not None else self._born + self._ttl
        wait = max(0.0, until - now)
        epoch = self._epochs.get(index, 0) + 1
        self._epochs[index] = epoch
        self._leases[index] = (epoch, holder, now + wait + self._ttl)
        return epoch, wait

    def release(self, index: int, epoch: int) -> None:
        """A holder that stops cleanly hands over at once (no wait for its successor)."""
        current = self._leases.get(index)
        if current is not None and current[0] == epoch:
            self._leases[index] = (epoch, current[1], self._clock())

    def renew(self, index: int, epoch: int) -> bool:
        """Extend the lease if `epoch` still holds it; False tells a superseded holder."""
        current = self._leases.get(index)
        if current is None or current[0] != epoch:
            return False
        self._leases[index] = (epoch, current[1], self._clock() + self._ttl)
        return True


def _restarted_by_ray() -> bool:
    try:
        import ray

        return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # not in a Ray actor
        return False


class Lease:
    """A shard's lease: acquired once, renewed in the background, checked before appends."""

    def __init__(
        self,
        index: int,
        ttl_s: float,
        acquire: Callable[[int, str], Awaitable[tuple[int, float]]],
        renew: Callable[[int, int], Awaitable[bool]],
        release: Callable[[int, int], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.index = index
        self.holder = uuid.uuid4().hex
        self._ttl = ttl_s
        self._acquire, self._renew, self._release, self._clock = acquire, renew, release, clock
        self.epoch = 0
        self._valid_until = 0.0
        self._lost = False
        self._renewing: asyncio.Task[None] | None = None
        self._ready = asyncio.Lock()

    async def hold(self) -> None:
        """Acquire the lease (waiting out a predecessor's) and keep renewing it."""
        async with self._ready:
            if self.epoch:
                return
            asked = self._clock()
            epoch, wait = await self._acquire(self.index, self.holder)
            if wait:
                log.info(
                    "shard %d waits %.1fs for its predecessor's lease to run out", self.index, wait
                )
                await asyncio.sleep(wait)
            self._valid_until = asked + wait + self._ttl * 0.9
            self.epoch = epoch
            self._renewing = asyncio.create_task(self._keep())

    async def _keep(self) -> None:
        while not self._lost:
            await asyncio.sleep(self._ttl / 3)
            asked = self._clock()
            try:
                still = await self._renew(self.index, self.epoch)
            except Exception as exc:  # the registry is unreachable: the lease just runs out
                log.warning("lease renewal failed: %r", exc)
                continue
            if not still:
                self._lost = True
                log.error("shard %d lost its write lease (epoch %d)", self.index, self.epoch)
                return
            # Counted from when we asked, so the lease never looks longer than it is.
            self._valid_until = asked + self._ttl * 0.9

    def check(self) -> None:
        """Raise LeaseLost unless this incarnation provably holds the lease now."""
        if not self.epoch:
            raise LeaseLost(f"shard {self.index} has not acquired its write lease")
        if self._lost or self._clock() > self._valid_until:
            raise LeaseLost(
                f"shard {self.index} (epoch {self.epoch}) no longer holds its write lease:"
                " another incarnation owns these streams"
            )

    async def release(self) -> None:
        """Stop writing and hand the lease back."""
        self._lost = True
        if self._renewing is not None:
            self._renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewing
        if self._release is not None and self.epoch:
            with contextlib.suppress(Exception):
                await self._release(self.index, self.epoch)


class LeasedSink:
    """An EventSink that appends only while the lease is held."""

    def __init__(self, sink: EventSink, lease: Lease) -> None:
        self._sink = sink
        self._lease = lease

    async def append(self, events: Sequence[Envelope[Any]]) -> None:
        self._lease.check()
        await self._sink.append(events)
