"""One message on its way in, whichever way it came: SMTP (``relayd.inbound.server``) or
the maildrop (``relayd.inbound.maildrop``), through the same policy into the spool.

A ``Submission`` is what is known once the envelope is complete: the client, the route
decided at MAIL FROM (SPEC "Routing": the account, the sender after ``rewrite_senders``)
and the recipients. ``MessageSink`` takes its content: the header policy (SPEC routing rule
5) on the header section, then the spool; ``submit_whole`` does both for content that
arrives complete rather than as a stream.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from relayd.config.apis import size_limit
from relayd.config.model import ClientConfig, Config
from relayd.core.envelope import Envelope
from relayd.core.routing import Refusal, RouteDecision, rewrite_sender
from relayd.inbound.data import (
    HEADER_TOO_LARGE_REPLY,
    NUL_REPLY,
    SIZE_REPLY,
    HeaderSection,
)
from relayd.inbound.headers import HeaderPolicy, apply_header_policy
from relayd.spool.reception import Reception
from relayd.spool.store import Spool, new_queue_id

__all__ = [
    "INTERNAL_REPLY",
    "STORAGE_REPLY",
    "MessageSink",
    "OnQueued",
    "Submission",
    "submit_whole",
]

log = logging.getLogger("relayd.inbound")

STORAGE_REPLY = "452 4.3.1 Insufficient system storage"
INTERNAL_REPLY = "451 4.3.0 Internal error"

#: Told (queue id, account address) once a message is durable: the scheduler's inlet, or
#: in an accepting process the announcement to the main process.
OnQueued = Callable[[str, str], None]


@dataclass(frozen=True)
class Submission:
    config: Config  # the configuration in force at MAIL FROM, kept for the whole message
    client: ClientConfig
    route: RouteDecision
    original_sender: str  # as the client wrote it, before rewrite_senders
    recipients: tuple[str, ...]
    peer: str  # "127.0.0.1:40112", "unix", "maildrop"
    smtputf8: bool
    local_hostnames: frozenset[str]

    def envelope(self) -> Envelope:
        account = self.route.account
        return Envelope(
            queue_id=new_queue_id(),
            received_at=time.time(),
            client=self.client.name,
            peer=self.peer,
            sender=self.route.sender,
            recipients=self.recipients,
            account=account.address,
            tenant=account.tenant,
            smtputf8=self.smtputf8,
        )

    def header_policy(self) -> HeaderPolicy:
        route, config = self.route, self.config
        account = route.account
        rewrite: Callable[[str], str] | None = None
        if self.original_sender.lower() != route.sender.lower():
            local_hostnames = self.local_hostnames

            def rewrite(address: str) -> str:
                return rewrite_sender(config, address, local_hostnames)

        return HeaderPolicy(
            sender=route.sender,
            # SPEC rule 5 names the sender and the account's aliases; the account's own
            # address is the mailbox the message leaves from, so naming it forges nothing.
            allowed=frozenset({route.sender.lower(), account.address, *account.aliases}),
            from_name=account.from_name,
            helo_name=config.helo_name,
            rewrite=rewrite,
        )


class MessageSink:
    """Where one accepted transaction's content goes: the header policy, then the spool."""

    def __init__(self, submission: Submission, spool: Spool, on_queued: OnQueued) -> None:
        self.submission = submission
        self.spool = spool
        self.on_queued = on_queued
        self.envelope = submission.envelope()
        self.policy = submission.header_policy()
        # The route's transport may carry less than the spool takes (Graph: 3 MiB); the
        # application hears so at the end of DATA, never as a bounce later.
        self.max_size, reply = size_limit(
            submission.route.account, submission.config.spool.max_message_size
        )
        self.size_reply = reply or SIZE_REPLY
        self._reception: Reception | None = None

    def start(self, head: bytes, rest: bytes) -> str | None:
        """Check the header section and open the spool file; the refusal reply, if any.

        Raises OSError (SpoolError) when the spool cannot take the message.
        """
        result = apply_header_policy(head, self.policy)
        if isinstance(result, Refusal):
            log.info(
                "%s: refused: client=%s from=<%s>: %s",
                self.envelope.peer,
                self.envelope.client,
                self.envelope.sender,
                result.reply,
            )
            return result.reply
        # The Message-ID rides in the envelope: the Sent-copy step looks for it.
        self.envelope = dataclasses.replace(self.envelope, message_id=result.message_id)
        self._reception = self.spool.receive(self.envelope)
        # The spool may give the message the queue id of a file reserved for it.
        self.envelope = self._reception.envelope
        self._reception.write(result.head)
        if rest and not rest.startswith(b"\r\n"):
            self._reception.write(b"\r\n")  # the body had no separator line before it
        self._reception.write(rest)
        return None

    def write(self, content: bytes) -> None:
        assert self._reception is not None
        self._reception.write(content)

    def commit(self) -> asyncio.Future[None]:
        """Make the message durable in the spool (file and directory fsync'd); the future is
        done then, or fails with SpoolError. From this call on, ``abort`` no longer touches
        the reception, and cancelling the future does not withdraw it (``Reception.submit``).

        The "accepted" log line and ``on_queued`` follow once the session has had its turn
        to reply: neither is in the time the client waits for its 250.
        """
        assert self._reception is not None
        reception, self._reception = self._reception, None
        return reception.submit(functools.partial(self._queued, reception.length))

    def _queued(self, size: int) -> None:
        env = self.envelope
        log.info(
            "accepted: client=%s peer=%s from=<%s> nrcpt=%d size=%d",
            env.client,
            env.peer,
            env.sender,
            len(env.recipients),
            size,
            extra={"queue_id": env.queue_id, "account": env.account},
        )
        try:
            self.on_queued(env.queue_id, env.account)
        except Exception:  # the message is safe in the spool; the scheduler's scan finds it
            log.exception("%s: on_queued callback failed", env.queue_id)

    def abort(self) -> None:
        if self._reception is not None:
            self._reception.abort()
            self._reception = None


async def submit_whole(sink: MessageSink, content: bytes) -> str:
    """Content that arrived complete (CRLF line endings already): the checks the SMTP
    server makes on a stream, the header policy, the spool; the reply it earns."""
    if b"\x00" in content:
        return NUL_REPLY
    if len(content) > sink.max_size:
        return sink.size_reply
    section = HeaderSection()
    split = section.feed(content) or section.finish()
    if split is None:
        return HEADER_TOO_LARGE_REPLY
    try:
        refusal = sink.start(*split)
        if refusal is not None:
            return refusal
        await sink.commit()
    except OSError as exc:  # SpoolError included: nothing was acknowledged
        sink.abort()
        log.error("%s: cannot spool a message: %s", sink.envelope.peer, exc)
        return STORAGE_REPLY
    return f"250 2.0.0 queued as {sink.envelope.queue_id}"
