"""The fleet's budget arithmetic: local shares, the per-second window, lease trust."""

from __future__ import annotations

import pytest

from relayd.core.budget import (
    FLEET_RATE_WINDOW,
    lease_trusted_until,
    local_share,
    second_of,
    wait_in_buckets,
)


@pytest.mark.parametrize(
    ("limit", "hosts", "share"),
    [(3, 3, 1), (30, 3, 10), (3, 1, 3), (3, 0, 3), (3, 5, 1), (30, 4, 7), (0, 3, 0)],
)
def test_local_share_is_at_most_the_limit_split_and_at_least_one(
    limit: int, hosts: int, share: int
) -> None:
    assert local_share(limit, hosts) == share


def test_a_lease_is_trusted_for_less_than_its_time() -> None:
    assert lease_trusted_until(1000.0, 30.0) == pytest.approx(1025.0)


def test_per_second_buckets_wait_for_the_oldest_second_to_leave_the_window() -> None:
    assert wait_in_buckets({100: 2}, 3, 100.5, 60.0) == 0.0
    assert wait_in_buckets({100: 2, 101: 1}, 3, 101.5, 60.0) == pytest.approx(59.5)
    # A second that left the window no longer counts.
    assert wait_in_buckets({30: 5, 100: 1}, 3, 100.5, 60.0) == 0.0
    # Two seconds must go before one more fits.
    assert wait_in_buckets({100: 1, 101: 1, 102: 1}, 2, 102.2, 60.0) == pytest.approx(59.8)
    assert wait_in_buckets({100: 1, 101: 1, 102: 2}, 2, 102.2, 60.0) == pytest.approx(60.8)
    assert wait_in_buckets({100: 9}, 0, 100.0, 60.0) == 0.0


def test_a_greedy_sender_on_buckets_never_exceeds_the_limit_in_any_minute() -> None:
    buckets: dict[int, int] = {}
    starts: list[float] = []
    now = 0.0
    while now < 300.0:
        wait = wait_in_buckets(buckets, 30, now, FLEET_RATE_WINDOW)
        if wait == 0.0:
            starts.append(now)
            buckets[second_of(now)] = buckets.get(second_of(now), 0) + 1
            now += 0.01
        else:
            now += wait
    assert len(starts) > 60  # it did go on, window after window
    for t in starts:
        assert len([s for s in starts if t <= s < t + 60.0]) <= 30
