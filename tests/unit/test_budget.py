"""The fleet's budget arithmetic: local shares, the sliding window, lease trust."""

from __future__ import annotations

import pytest

from relayd.core.budget import FLEET_RATE_WINDOW, lease_trusted_until, local_share, wait_in_window


@pytest.mark.parametrize(
    ("limit", "hosts", "share"),
    [(3, 3, 1), (30, 3, 10), (3, 1, 3), (3, 0, 3), (3, 5, 1), (30, 4, 7), (0, 3, 0)],
)
def test_local_share_is_at_most_the_limit_split_and_at_least_one(
    limit: int, hosts: int, share: int
) -> None:
    assert local_share(limit, hosts) == share


def test_sliding_window_admits_up_to_the_limit_then_waits_for_the_oldest() -> None:
    starts = [100.0, 101.0, 102.0]
    assert wait_in_window(starts[:2], 3, 103.0, 60.0) == 0.0
    assert wait_in_window(starts, 3, 103.0, 60.0) == pytest.approx(57.0)
    # Once the oldest is a window old, one more fits.
    assert wait_in_window(starts, 3, 160.0, 60.0) == 0.0
    assert wait_in_window(starts, 2, 103.0, 60.0) == pytest.approx(58.0)
    assert wait_in_window(starts, 0, 103.0, 60.0) == 0.0


def test_a_minute_of_starts_at_the_fleet_window_never_exceeds_the_limit_in_any_minute() -> None:
    # Simulate a greedy sender: whenever the window allows, it starts at once.
    starts: list[float] = []
    now = 0.0
    while now < 300.0:
        wait = wait_in_window(starts, 30, now, FLEET_RATE_WINDOW)
        if wait == 0.0:
            starts.append(now)
        else:
            now += wait
    for t in starts:
        assert len([s for s in starts if t <= s < t + 60.0]) <= 30


def test_a_lease_is_trusted_for_less_than_its_time() -> None:
    assert lease_trusted_until(1000.0, 30.0) == pytest.approx(1025.0)
