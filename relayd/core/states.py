"""Spool state transitions after a delivery attempt: pure, from per-recipient verdicts.

One function owns the rule that decides whether a message leaves the spool, waits in
``deferred/``, or waits in ``hold/``; which recipients bounce (only the refused ones — SPEC
"bounced"); and when the retry lifetime is over. Held mail never expires (SPEC: held mail does
not expire), because nothing about it is wrong but the account's credentials.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from relayd.config.model import RetryPolicy
from relayd.core.envelope import DeliveryState, Envelope
from relayd.core.outcome import Verdict
from relayd.core.retry import expired, next_delay

__all__ = ["Plan", "RecipientResult", "Target", "plan_after_attempt"]


class Target(enum.Enum):
    DONE = "done"  # every recipient delivered or bounced: remove from the spool
    DEFERRED = "deferred"
    HOLD = "hold"


@dataclass(frozen=True)
class RecipientResult:
    recipient: str
    verdict: Verdict
    status: str  # enhanced status code
    reply: str  # what to log and to put in a DSN


@dataclass(frozen=True)
class Plan:
    target: Target
    state: DeliveryState
    bounce: tuple[RecipientResult, ...]  # newly bounced: they get a DSN
    expired: bool
    # Still waiting past spool.delay_warning: they get the one "delayed" DSN (RFC 3464).
    delayed: tuple[RecipientResult, ...] = ()


def plan_after_attempt(
    envelope: Envelope,
    state: DeliveryState,
    results: list[RecipientResult],
    *,
    now: float,
    policy: RetryPolicy,
    random_unit: float,
    relay: str,
    account_paused: bool = False,
    delay_warning: float = 0.0,
) -> Plan:
    """``account_paused``: the attempt's credential refusal paused the account (hold the mail);
    a first refusal only defers it, so the second consecutive one can decide (SPEC "held").

    ``delay_warning`` (seconds, 0 = off): a message deferred that long after its arrival
    earns its sender one "delayed" DSN, as Postfix's ``delay_warning_time`` does; never about
    a DSN, and not for held mail, which waits on the account rather than on the upstream.
    """
    delivered = list(state.delivered)
    bounced = list(state.bounced)
    new_bounces: list[RecipientResult] = []
    waiting: list[RecipientResult] = []
    for r in results:
        if r.verdict is Verdict.DELIVERED:
            delivered.append(r.recipient)
        elif r.verdict is Verdict.BOUNCED:
            bounced.append(r.recipient)
            new_bounces.append(r)
        else:
            waiting.append(r)
    attempts = state.attempts + 1
    last = results[-1].reply if results else state.last_reply
    held = any(r.verdict is Verdict.HELD for r in waiting)
    is_expired = False
    if waiting and not held and expired(policy, envelope.received_at, now):
        is_expired = True
        for r in waiting:
            bounced.append(r.recipient)
            new_bounces.append(
                RecipientResult(
                    r.recipient,
                    Verdict.BOUNCED,
                    "4.4.7" if r.status.startswith("4") else r.status,
                    f"delivery time expired; last reply: {r.reply}",
                )
            )
        waiting = []
    new_state = state.but(
        attempts=attempts,
        first_attempt_at=state.first_attempt_at or now,
        delivered=tuple(delivered),
        bounced=tuple(bounced),
        last_reply=last,
        relay=relay,
        delivered_at=now if not waiting and delivered else state.delivered_at,
    )
    if not waiting:
        return Plan(Target.DONE, new_state, tuple(new_bounces), is_expired)
    if held and account_paused:
        return Plan(Target.HOLD, new_state.but(next_attempt_at=0.0), tuple(new_bounces), False)
    delay = next_delay(policy, attempts, random_unit)
    new_state = new_state.but(next_attempt_at=now + delay)
    delayed: tuple[RecipientResult, ...] = ()
    if (
        delay_warning > 0
        and not state.delay_warned
        and not envelope.is_dsn
        and now - envelope.received_at >= delay_warning
    ):
        delayed = tuple(waiting)
        new_state = new_state.but(delay_warned=True)
    return Plan(Target.DEFERRED, new_state, tuple(new_bounces), False, delayed)
