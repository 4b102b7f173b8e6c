"""What the scheduler tells the outside world about deliveries: metrics and alerts listen.

The scheduler calls these hooks at the moments that matter to an operator; the base class
does nothing, so the scheduler runs unchanged without a daemon around it (unit tests), and
``relayd.ops.service`` supplies the implementation that counts and alerts.
"""

from __future__ import annotations

from relayd.config.model import AccountConfig
from relayd.core.envelope import Envelope
from relayd.spool.store import Spool

__all__ = ["DeliveryEvents", "is_operator_hold", "is_tls_failure", "set_operator_hold"]

# The wording relayd.upstream.transport gives TLS failures (certificate, handshake, a server
# that stopped offering STARTTLS): the attempt report carries only this text.
_TLS_FAILURES = ("certificate not trusted", "TLS handshake failed", "does not offer STARTTLS")


def is_tls_failure(detail: str) -> bool:
    return any(marker in detail for marker in _TLS_FAILURES)


class DeliveryEvents:
    """No-op hooks; every method must return quickly and never raise."""

    def recipient_outcome(self, account: str, status: str, latency: float) -> None:
        """One recipient's attempt ended: delivered, deferred, bounced or held."""

    def account_paused(self, account: AccountConfig, reason: str) -> None:
        """Credentials refused twice in a row: the account's mail is held (once per pause)."""

    def send_as_denied(self, account: AccountConfig, reason: str) -> None:
        """The provider refused the sender address (554 5.2.252 SendAsDenied and similar)."""

    def connection_failed(self, account: AccountConfig, detail: str) -> None:
        """Network or TLS failure reaching the account's upstream."""

    def attempt_succeeded(self, account: AccountConfig) -> None:
        """A login or delivery worked: open incidents for the account are over."""

    def mail_expired(self, envelope: Envelope, recipients: tuple[str, ...]) -> None:
        """``give_up_after`` passed: these recipients were bounced."""

    def sent_copy_dropped(self, account: str, queue_id: str, reason: str) -> None:
        """The IMAP Sent copy of a message was given up after ``give_up_after``."""


# A message in hold/ is there because its account is paused, or because the operator said
# `relayd queue hold`; only the second must survive the account resuming. The mark lives in
# the message's delivery state, beside the attempt history.
_OPERATOR_HOLD = "operator_hold"


def is_operator_hold(spool: Spool, queue_id: str) -> bool:
    return bool(spool.read_state(queue_id).extra.get(_OPERATOR_HOLD))


def set_operator_hold(spool: Spool, queue_id: str, held: bool) -> None:
    state = spool.read_state(queue_id)
    extra = {k: v for k, v in state.extra.items() if k != _OPERATOR_HOLD}
    if held:
        extra[_OPERATOR_HOLD] = True
    elif extra == state.extra:
        return
    spool.write_state(queue_id, state.but(extra=extra))
