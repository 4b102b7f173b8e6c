"""Delivery status notifications for the sender's own mailbox (SPEC "DSNs"), after an attempt.

Recipients refused for good (or out of retry time) get a "failed" DSN; with
``spool.delay_warning``, recipients still waiting that long get one "delayed" DSN. Either is
filed in the sender's INBOX over IMAP when the account has IMAP (it works while SMTP is down,
and never lands in Sent), else spooled here and sent through the same account to itself. No
DSN is ever written about a DSN. What the DSN says is ``relayd.upstream.dsn``; which
recipients earn one is ``relayd.core.states``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from relayd.config.model import AccountConfig
from relayd.core.envelope import Envelope
from relayd.core.states import Plan, RecipientResult
from relayd.spool.store import Spool, StoredMessage, new_queue_id
from relayd.sync.filing import FilingStage
from relayd.upstream.dsn import HEADER_LIMIT, BouncedRecipient, build_dsn

__all__ = ["SenderNotices"]

log = logging.getLogger(__name__)

EXPIRED = "The message could not be delivered before the retry lifetime ended."
REFUSED = "The receiving server refused these recipients permanently."
DELAYED = (
    "This is a warning only: delivery is being retried, and you need not send the message again."
)


class SenderNotices:
    """``enqueue(queue id, account)`` hands a DSN spooled in ``incoming/`` to the scheduler."""

    def __init__(
        self,
        *,
        spool: Spool,
        filing: FilingStage | None,
        enqueue: Callable[[str, str | None], None],
        reporting_host: str,
        clock: Callable[[], float],
    ) -> None:
        self.spool = spool
        self.filing = filing
        self.enqueue = enqueue
        self.reporting_host = reporting_host
        self.clock = clock

    async def after_attempt(
        self,
        msg: StoredMessage,
        account: AccountConfig,
        plan: Plan,
        give_up_after: float,
        logx: dict[str, str],
    ) -> None:
        relay = plan.state.relay
        if plan.bounce:
            reason = EXPIRED if plan.expired else REFUSED
            await self.send(msg, account, plan.bounce, relay, reason, logx)
        if plan.delayed:
            until = msg.envelope.received_at + give_up_after
            await self.send(msg, account, plan.delayed, relay, DELAYED, logx, retry_until=until)

    async def send(
        self,
        msg: StoredMessage,
        account: AccountConfig,
        results: tuple[RecipientResult, ...],
        relay: str,
        reason: str,
        logx: dict[str, str],
        *,
        retry_until: float | None = None,
    ) -> None:
        """A DSN to the sender about ``results``: bounced ones, or with ``retry_until`` the
        "delayed" warning (``spool.delay_warning``)."""
        envelope = msg.envelope
        if envelope.is_dsn:
            log.warning("a DSN could not be delivered; no DSN is written about a DSN", extra=logx)
            return
        # RFC 6522 text/rfc822-headers: the header section is all a DSN carries back.
        head = await asyncio.to_thread(msg.head_section, HEADER_LIMIT)
        remote_mta = relay.rpartition(":")[0]
        dsn_bytes = build_dsn(
            queue_id=msg.queue_id,
            reporting_host=self.reporting_host,
            from_address=account.address,
            to_address=envelope.sender,
            original_sender=envelope.sender,
            received_at=envelope.received_at,
            recipients=[
                BouncedRecipient(r.recipient, r.status, r.reply, remote_mta) for r in results
            ],
            original_content=head,
            reason=reason,
            retry_until=retry_until,
        )
        # The DSN goes into the sender's own mailbox (SPEC "DSNs"): filed in its INBOX over
        # IMAP when the account has IMAP, else sent through the same account to itself.
        dsn_envelope = Envelope(
            queue_id=new_queue_id(),
            received_at=self.clock(),
            client="relayd",
            peer="local",
            sender=account.address,
            recipients=(envelope.sender,),
            account=envelope.account,
            tenant=envelope.tenant,
            is_dsn=True,
        )
        kind = "delay" if retry_until is not None else "non-delivery"
        filing = self.filing
        if filing is not None and await filing.take_dsn(dsn_envelope, dsn_bytes, account):
            log.info(
                "sender %s notification: %s, for the INBOX over IMAP",
                kind,
                dsn_envelope.queue_id,
                extra=logx,
            )
            return
        reception = self.spool.receive(dsn_envelope)
        try:
            reception.write(dsn_bytes)
        except OSError:
            reception.abort()
            log.error("cannot spool DSN", extra=logx)
            return
        dsn_id = await reception.commit()
        log.info("sender %s notification: %s", kind, dsn_id, extra=logx)
        self.enqueue(dsn_id, dsn_envelope.account)
