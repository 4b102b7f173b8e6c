"""What every way of handing a message to a provider has in common: the ``Transport``.

The scheduler keeps one open transport per connection slot of an account's lane and hands
it message after message; it never knows whether the transport speaks SMTP
(``relayd.upstream.smtp``), writes the capture Maildir (``relayd.upstream.capture``) or
calls an HTTP send API. A transport maps what went wrong at its boundary into an
``AttemptError`` (the phase, and the server's ``Reply`` or a ``Failure``) and what each
recipient was told into a ``TransactionResult``; ``relayd.core.outcome`` decides what those
mean, so no transport decides policy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from relayd.config.model import AccountConfig
from relayd.core.outcome import Failure, Phase, Reply
from relayd.upstream.dataphase import ContentSource

__all__ = [
    "DEFAULT_TIMEOUTS",
    "AttemptError",
    "Timeouts",
    "TransactionResult",
    "Transport",
    "TransportFactory",
]


@dataclass(frozen=True)
class Timeouts:
    """Per-phase timeouts, after RFC 5321 §4.5.3.2 (shortened: a relay should fail fast)."""

    connect: float = 30.0
    command: float = 60.0
    data: float = 300.0  # the whole DATA transfer plus the final reply


DEFAULT_TIMEOUTS = Timeouts()


class AttemptError(Exception):
    """The transport broke down in ``phase``: the server said ``Reply``, or nothing could be
    said (``Failure``: network, TLS, timeout, token endpoint)."""

    def __init__(self, phase: Phase, outcome: Reply | Failure) -> None:
        super().__init__(str(outcome))
        self.phase = phase
        self.outcome = outcome


@dataclass(frozen=True)
class TransactionResult:
    """What one transaction said to each recipient: the phase and the reply."""

    replies: dict[str, tuple[Phase, Reply]]


class Transport(Protocol):
    """An account's way in to its provider, opened once and reused across messages."""

    @property
    def relay(self) -> str:
        """Where the messages go, for the log line (``host:port``, ``capture:PATH``)."""
        ...

    @property
    def is_open(self) -> bool: ...

    async def open(self) -> None:
        """Connect, secure and log in; raises AttemptError."""
        ...

    async def send(
        self,
        sender: str,
        recipients: tuple[str, ...],
        content: ContentSource,
        *,
        smtputf8: bool = False,
    ) -> TransactionResult:
        """One message to ``recipients``; raises AttemptError if the transport broke, and the
        spool's SpoolError if the message file could not be read (never sent cut short)."""
        ...

    async def probe(self) -> None:
        """Log in and leave: a paused account's probe (SPEC "Delivery"); AttemptError."""
        ...

    async def quit(self) -> None:
        """Close politely (SMTP QUIT); never raises."""
        ...

    def close(self) -> None:
        """Close at once; never raises."""
        ...


TransportFactory = Callable[[AccountConfig], Transport]
