"""The lease, on both stores: one holder at a time, expiry and takeover, renewal, release."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from service.lease import Lease, LeaseBusy, LeaseLost, LeaseRecord
from service.storage import ObjectStore

KEY = "processed_data/output.csv.lease"
T0 = datetime(2030, 1, 1, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def lease(store: ObjectStore, replica: str, clock: Clock | None = None, ttl: float = 30) -> Lease:
    return Lease(store, KEY, replica, ttl, clock=clock or Clock())


async def test_one_holder_at_a_time_and_a_release_frees_it_at_once(store: ObjectStore) -> None:
    a, b = lease(store, "a"), lease(store, "b")
    async with a.hold(1) as holding:
        holding.check()
        with pytest.raises(LeaseBusy, match="'a' holds the lease") as busy:
            async with b.hold(7):
                pytest.fail("two holders")
        assert busy.value.holder.replica == "a" and busy.value.holder.run == 1
        assert (await b.holder()) == holding.record
    assert await b.holder() is None  # released: an expired record
    async with b.hold(8) as holding:
        assert holding.record.replica == "b"
    record = LeaseRecord.from_bytes(await store.get(KEY))
    assert record is not None and (record.replica, record.run) == ("b", 8)


async def test_an_expired_lease_is_taken_over_and_its_holder_may_not_commit(store: ObjectStore) -> None:
    clock_a, clock_b = Clock(), Clock()
    a, b = lease(store, "a", clock_a), lease(store, "b", clock_b)
    async with a.hold(1) as held_by_a:
        clock_b.now = T0 + timedelta(seconds=31)  # a paused holder: its lease ran out
        async with b.hold(2) as held_by_b:
            held_by_b.check()
            clock_a.now = T0 + timedelta(seconds=31)
            with pytest.raises(LeaseLost, match="expired"):
                held_by_a.check()
            await held_by_a._renew()  # too late: nothing is written over b's lease
            record = LeaseRecord.from_bytes(await store.get(KEY))
            assert record is not None and record.replica == "b"


async def test_a_holder_whose_lease_was_taken_learns_it_when_renewing(store: ObjectStore) -> None:
    clock_a, clock_b = Clock(), Clock()
    a, b = lease(store, "a", clock_a), lease(store, "b", clock_b)
    async with a.hold(1) as held_by_a:
        clock_b.now = T0 + timedelta(seconds=31)
        async with b.hold(2):
            clock_a.now = T0 + timedelta(seconds=5)  # a's clock says its lease still runs
            await held_by_a._renew()
            with pytest.raises(LeaseLost, match="another replica took it over"):
                held_by_a.check()


async def test_renewal_keeps_the_lease_past_its_first_expiry(store: ObjectStore) -> None:
    a, b = Lease(store, KEY, "a", ttl=0.6), Lease(store, KEY, "b", ttl=0.6)
    async with a.hold(1) as holding:
        await asyncio.sleep(1.0)  # longer than the time to live: renewed every 0.2 s meanwhile
        holding.check()
        with pytest.raises(LeaseBusy):
            async with b.hold(2):
                pytest.fail("taken while renewed")


async def test_of_thirty_racers_exactly_one_takes_the_lease(store: ObjectStore) -> None:
    gate = asyncio.Event()
    winners: list[str] = []

    async def race(name: str) -> None:
        try:
            async with lease(store, name).hold(1):
                winners.append(name)
                await gate.wait()
        except LeaseBusy:
            return

    racers = [asyncio.create_task(race(f"r{i}")) for i in range(30)]
    for _ in range(200):
        if winners or all(r.done() for r in racers):
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)  # any second winner would have appeared by now
    gate.set()
    await asyncio.wait_for(asyncio.gather(*racers), timeout=30)
    assert len(winners) == 1, winners


async def test_an_unreadable_lease_object_counts_as_free(store: ObjectStore) -> None:
    await store.put(KEY, b"not a lease")
    async with lease(store, "a").hold(3) as holding:
        assert holding.record.run == 3


async def test_two_processes_that_share_a_replica_name_are_warned_about(
    store: ObjectStore, caplog: pytest.LogCaptureFixture
) -> None:
    first, second = lease(store, "same"), lease(store, "same")
    async with first.hold(1), second.hold(2):  # the lease names this replica: taken, but not silently
        pass
    warnings = [r for r in caplog.records if "share REPLICA_ID" in r.getMessage()]
    assert len(warnings) == 1 and "'same'" in warnings[0].getMessage()
    async with first.hold(3), first.hold(4):  # a process's own lease: no warning
        pass
    assert len([r for r in caplog.records if "share REPLICA_ID" in r.getMessage()]) == 1
