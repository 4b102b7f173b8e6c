"""The capture provider's transport: delivery into a local Maildir, nothing leaves the machine.

Every message "sent" is written to the account's ``capture.path`` (``relayd.maildir``), as an
SMTP server would have received it (``relayd.core.lines.as_delivered``), so its Sent copy,
which the filing stage makes in the Maildir's ``.Sent`` folder, is the same bytes.
"""

from __future__ import annotations

import asyncio

from relayd.config.model import AccountConfig
from relayd.core.lines import as_delivered
from relayd.core.outcome import Phase, Reply
from relayd.maildir import CaptureMaildir
from relayd.upstream.dataphase import ContentSource
from relayd.upstream.transport import TransactionResult

__all__ = ["CaptureTransport"]


class CaptureTransport:
    """A ``Transport`` that is always open: there is nothing to connect or log in to."""

    def __init__(self, account: AccountConfig, *, fsync: bool = True) -> None:
        assert account.capture_path is not None
        self.maildir = CaptureMaildir(account.capture_path, fsync=fsync)

    @property
    def relay(self) -> str:
        return f"capture:{self.maildir.path}"

    @property
    def is_open(self) -> bool:
        return True

    async def open(self) -> None:
        return None

    async def send(
        self,
        sender: str,
        recipients: tuple[str, ...],
        content: ContentSource,
        *,
        smtputf8: bool = False,
    ) -> TransactionResult:
        def deliver() -> str:
            data = as_delivered(b"".join(content.iter_content()))
            return self.maildir.deliver(sender, recipients, data).name

        name = await asyncio.to_thread(deliver)
        reply = Reply(250, f"2.0.0 captured as {name}")
        return TransactionResult({r: (Phase.DATA, reply) for r in recipients})

    async def probe(self) -> None:
        return None

    async def quit(self) -> None:
        return None

    def close(self) -> None:
        return None
