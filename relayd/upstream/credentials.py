"""Where an upstream login gets its secret: the app password, or (OAuth) a token source."""

from __future__ import annotations

from relayd.config.model import AccountConfig
from relayd.core.outcome import Failure, FailureKind, Phase
from relayd.upstream.transport import AttemptError

__all__ = ["credentials_for"]


async def credentials_for(account: AccountConfig) -> str:
    if account.password is not None:
        return account.password.reveal()
    # OAuth2 accounts need the token source (XOAUTH2); until one is configured for this
    # account the mail waits in the spool rather than bouncing.
    raise AttemptError(
        Phase.TOKEN,
        Failure(Phase.TOKEN, FailureKind.PROTOCOL, "no OAuth2 token source for this account"),
    )
