"""Fleet budgets while the database is unreachable: only local rules apply, so these run
with a database object that is offline (no call reaches it) and a clock of the test's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import pytest

from relayd.core.budget import FLEET_RATE_WINDOW, second_of
from relayd.fleet.budgets import FleetBudgets, Permit
from relayd.fleet.database import FleetDatabase


@dataclass
class OfflineDatabase:
    name: str = "host-a"
    online: bool = False
    offline_since: float | None = 1000.0
    online_since: float | None = None


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def budgets(clock: Clock, hosts: int = 3, lease_time: float = 6.0) -> FleetBudgets:
    db = cast(FleetDatabase, OfflineDatabase())
    return FleetBudgets(db, lease_time=lease_time, hosts_seen=lambda: hosts, clock=clock)


async def ask(b: FleetBudgets, address: str, limit: int) -> Permit | None:
    tries = iter([True, False])
    return await b.connection(address, limit, lambda: next(tries))


async def test_no_local_connection_before_the_lease_time_then_a_share() -> None:
    clock = Clock(1003.0)  # 3 s after the database went away; leases last 6 s
    b = budgets(clock)
    assert await ask(b, "a@x", 3) is None
    clock.now = 1006.5
    first = await ask(b, "a@x", 3)
    assert first is not None and first.slot is None
    assert await ask(b, "a@x", 3) is None  # 3 connections over 3 hosts: one here
    await b.release(first)
    assert await ask(b, "a@x", 3) is not None


async def test_a_lease_past_its_trust_is_kept_only_within_the_local_share() -> None:
    clock = Clock(1010.0)
    b = budgets(clock)
    held = [Permit("a@x", slot, f"id{slot}", trusted_until=1005.0) for slot in range(3)]
    for permit in held:
        b._of("a@x").permits.add(permit)
    kept = [b.keep(p, 3) for p in held]
    assert kept.count(True) == 1  # one connection of the three goes on, as a local share
    assert [p.slot for p, k in zip(held, kept, strict=True) if k] == [None]
    # Still trusted: kept as it is, whatever the share.
    trusted = Permit("b@x", 0, "t", trusted_until=1020.0)
    b._of("b@x").permits.add(trusted)
    assert b.keep(trusted, 1) and trusted.slot == 0
    trusted.lost = True
    assert not b.keep(trusted, 1)


async def test_offline_starts_count_against_the_fleets_last_window_and_a_share() -> None:
    clock = Clock(2000.0)
    b = budgets(clock)  # 30 a minute over 3 hosts: 10 here
    # The fleet had started 8 in the last window as this host last saw it.
    b._of("a@x").recent = {second_of(1990.0): 8}
    started = 0
    while await b.pace("a@x", 30) == 0.0:
        started += 1
    assert started == 2  # 8 + 2 = the share of 10
    wait = await b.pace("a@x", 30)
    assert wait == pytest.approx(1990 + 1 + FLEET_RATE_WINDOW - 2000.0)
    # What it started is kept to be written to the fleet's window once it is back.
    assert b._of("a@x").unsynced == {second_of(2000.0): 2}


async def test_a_throttle_from_any_host_pauses_the_starts() -> None:
    clock = Clock(3000.0)
    b = budgets(clock)
    b._of("a@x").throttled_until = 3030.0
    assert await b.pace("a@x", 0) == pytest.approx(30.0)
    clock.now = 3031.0
    assert await b.pace("a@x", 0) == 0.0
