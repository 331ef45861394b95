"""Write leases: a replaced shard stops writing before its replacement starts."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from infra.adapters.inmemory import InMemoryLog
from infra.ray.lease import Lease, LeasedSink, LeaseLost, LeaseRegistry
from tests.factories import make_event


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def lease_on(registry: LeaseRegistry, clock: Clock, ttl: float = 6.0) -> Lease:
    async def acquire(index: int, holder: str) -> tuple[int, float]:
        return registry.acquire(index, holder)

    async def renew(index: int, epoch: int) -> bool:
        return registry.renew(index, epoch)

    async def release(index: int, epoch: int) -> None:
        registry.release(index, epoch)

    return Lease(0, ttl, acquire, renew, release, clock=clock)


def test_a_new_holder_waits_out_the_old_lease_and_supersedes_it() -> None:
    clock = Clock()
    registry = LeaseRegistry(ttl_s=6.0, clock=clock, restarted=False)
    clock.t += 10
    first_epoch, wait = registry.acquire(0, "a")
    assert wait == 0
    clock.t += 2
    second_epoch, wait = registry.acquire(0, "b")
    assert second_epoch == first_epoch + 1 and wait == pytest.approx(4.0)
    assert not registry.renew(0, first_epoch)  # the old holder learns it lost
    assert registry.renew(0, second_epoch)


def test_a_restarted_registry_makes_the_first_holder_wait_a_full_lease() -> None:
    clock = Clock()
    assert (
        LeaseRegistry(ttl_s=6.0, clock=clock, restarted=False).acquire(0, "a")[1] == 0
    )  # a fresh one does not
    registry = LeaseRegistry(ttl_s=6.0, clock=clock, restarted=True)
    _, wait = registry.acquire(0, "a")
    assert wait == pytest.approx(6.0)  # someone may still hold a lease it never heard of


async def test_a_superseded_shard_refuses_to_append_and_writes_nothing() -> None:
    clock = Clock()
    registry = LeaseRegistry(ttl_s=0.3, clock=clock, restarted=False)
    clock.t += 1
    log = InMemoryLog()
    old = lease_on(registry, clock, ttl=0.3)
    await old.hold()
    sink = LeasedSink(log, old)
    await sink.append([make_event(version=1)])
    # A replacement takes over; the old holder's next renewal tells it so.
    registry.acquire(0, "replacement")
    # Wait for its next renewal (every ttl / 3) however busy the machine is.
    for _ in range(200):
        if old._lost:
            break
        await asyncio.sleep(0.05)
    with pytest.raises(LeaseLost, match="no longer holds its write lease"):
        await sink.append([make_event(version=2)])
    assert len(log.records) == 1
    await old.release()


async def test_a_lease_that_cannot_be_renewed_runs_out() -> None:
    clock = Clock()
    registry = LeaseRegistry(ttl_s=6.0, clock=clock, restarted=False)
    clock.t += 10
    lease = lease_on(registry, clock)
    await lease.hold()
    lease.check()
    clock.t += 6  # no renewal got through for a whole lease (e.g. the registry is unreachable)
    with pytest.raises(LeaseLost):
        lease.check()
    await lease.release()


async def test_a_clean_stop_hands_over_at_once() -> None:
    clock = Clock()
    registry = LeaseRegistry(ttl_s=6.0, clock=clock, restarted=False)
    clock.t += 10
    lease = lease_on(registry, clock)
    await lease.hold()
    await lease.release()
    _, wait = registry.acquire(0, "next")
    assert wait == 0


def test_lease_lost_is_a_version_conflict() -> None:
    from actors.context import VersionConflict

    error: Any = LeaseLost("x")
    assert isinstance(error, VersionConflict)
