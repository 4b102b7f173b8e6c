"""What the scheduler tells the outside world about deliveries: metrics and alerts listen.

The scheduler calls these hooks at the moments that matter to an operator; the base class
does nothing, so the scheduler runs unchanged without a daemon around it (unit tests), and
``relayd.ops.service`` supplies the implementation that counts and alerts.
"""

from __future__ import annotations

from relayd.config.model import AccountConfig
from relayd.core.envelope import Envelope
from relayd.core.outcome import Failure, Reply

__all__ = ["DeliveryEvents"]


class DeliveryEvents:
    """No-op hooks; every method must return quickly and never raise."""

    def recipient_outcome(self, account: str, status: str, latency: float) -> None:
        """One recipient's attempt ended: delivered, deferred, bounced or held."""

    def account_paused(self, account: AccountConfig, reason: str) -> None:
        """Credentials refused twice in a row: the account's mail is held (once per pause)."""

    def send_as_denied(self, account: AccountConfig, reason: str) -> None:
        """The provider refused the sender address (554 5.2.252 SendAsDenied and similar)."""

    def connection_failed(self, account: AccountConfig, cause: Reply | Failure) -> None:
        """The account's upstream could not be reached, secured or greeted."""

    def attempt_succeeded(self, account: AccountConfig) -> None:
        """A login or delivery worked: open incidents for the account are over."""

    def mail_expired(self, envelope: Envelope, recipients: tuple[str, ...]) -> None:
        """``give_up_after`` passed: these recipients were bounced."""
