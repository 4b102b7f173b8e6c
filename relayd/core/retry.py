"""The retry schedule: exponential backoff with jitter, capped, with a lifetime.

Postfix retries after 300 s, doubles up to 4000 s and gives up after 5 days; SPEC's defaults
(5m / 1h / 5d) follow it. Jitter spreads retries of a backlog so that an upstream coming back
is not hit by every deferred message in the same second.
"""

from __future__ import annotations

from relayd.config.model import RetryPolicy

__all__ = ["expired", "next_delay"]

JITTER = 0.2  # ±20 %


def next_delay(policy: RetryPolicy, attempts: int, random_unit: float) -> float:
    """Delay before the next attempt after ``attempts`` failed ones (attempts >= 1).

    ``random_unit`` is a number in [0, 1) from the caller, so the schedule is testable.
    """
    # The exponent is capped: 2**63 seconds is past any max, and a float power of a huge int
    # would overflow after ~1024 attempts.
    base = policy.first * 2.0 ** min(max(0, attempts - 1), 63)
    base = min(base, policy.max)
    delay = base * (1 - JITTER + 2 * JITTER * random_unit)
    return float(max(0.0, min(delay, policy.max * (1 + JITTER))))


def expired(policy: RetryPolicy, received_at: float, now: float) -> bool:
    return now - received_at >= policy.give_up_after
