"""Per-mailbox budgets across a fleet of hosts: the arithmetic, without I/O or a clock.

A provider's limits are per mailbox (Microsoft 365: 3 concurrent SMTP sessions and 30
messages a minute), however many hosts send as it. With the fleet database reachable, the
hosts share one count (``relayd.fleet.budgets``); without it, each host keeps to a
conservative share of its own, ``limit // hosts seen`` (at least one, or nothing would be
delivered at all), so that the fleet together stays within the limit.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = [
    "FLEET_RATE_WINDOW",
    "RATE_GUARD",
    "lease_trusted_until",
    "local_share",
    "second_of",
    "wait_in_buckets",
]

# A message is counted when its attempt starts; the provider counts it when its DATA
# arrives, a login's time later on a new session and a few milliseconds on a kept one. Two
# starts exactly a minute apart can thus arrive less than a minute apart: the shared window
# is a second longer than the minute it protects.
RATE_GUARD = 1.0
FLEET_RATE_WINDOW = 60.0 + RATE_GUARD


def local_share(limit: int, hosts: int) -> int:
    """This host's part of ``limit`` while it cannot reach the others; 0: no limit."""
    if limit <= 0:
        return 0
    return max(1, limit // max(1, hosts))


def second_of(when: float) -> int:
    return int(when // 1)


def wait_in_buckets(buckets: Mapping[int, int], limit: int, now: float, window: float) -> float:
    """Seconds until one more start fits, the starts counted per whole second (the fleet's
    window: a bounded number of rows however many starts). A second's starts count until
    that whole second has left the window, so this waits at most a second longer than the
    exact count would."""
    if limit <= 0:
        return 0.0
    live = sorted((s, n) for s, n in buckets.items() if s + 1 > now - window and n > 0)
    total = sum(n for _, n in live)
    if total < limit:
        return 0.0
    for second, count in live:
        total -= count
        if total < limit:
            return max(0.0, second + 1 + window - now)
    return 0.0  # not reached: the loop ends below the limit


def lease_trusted_until(renewal_sent_at: float, lease_time: float) -> float:
    """Until when a holder may use a lease it renewed: the database extended it to at least
    ``renewal_sent_at + lease_time``, so the others cannot take it before that; the holder
    gives a sixth of it away as a margin for clock rates and a late answer."""
    return renewal_sent_at + lease_time * 5.0 / 6.0
