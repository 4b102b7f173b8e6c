"""Where an upstream login gets its credential: the app password, or an OAuth2 access token.

Token errors are mapped here, at the boundary, into what ``relayd.core.outcome`` classifies:
an unreachable or failing token endpoint is a ``Failure`` (deferred, tokens kept); a refused
grant (``invalid_grant``, no consent yet) is a ``Reply`` in ``Phase.TOKEN`` that counts as
credentials refused (held, then paused), carrying the hint to run ``relayd auth``.
"""

from __future__ import annotations

from relayd.config.model import AccountConfig
from relayd.core.outcome import Failure, FailureKind, Phase, Reply
from relayd.log import redactor
from relayd.oauth.tokens import ConsentRequired, TokenEndpointUnavailable, TokenSource
from relayd.upstream.transport import AttemptError, Credential, Mechanism

__all__ = ["AccountCredentials"]


class AccountCredentials:
    """The daemon's ``CredentialSource``."""

    def __init__(self, tokens: TokenSource | None = None) -> None:
        self.tokens = tokens

    async def obtain(self, account: AccountConfig) -> Credential:
        if account.password is not None:
            return Credential(account.username, account.password.reveal(), Mechanism.PASSWORD)
        if account.oauth is None or self.tokens is None:
            raise AttemptError(
                Phase.TOKEN,
                Failure(Phase.TOKEN, FailureKind.PROTOCOL, "no credentials for this account"),
            )
        try:
            token = await self.tokens.access_token(account)
        except TokenEndpointUnavailable as exc:
            raise AttemptError(
                Phase.TOKEN, Failure(Phase.TOKEN, FailureKind.NETWORK, str(exc))
            ) from None
        except ConsentRequired as exc:
            # RFC 4954's 535 5.7.8 "authentication credentials invalid": what the provider
            # would say, had relayd sent it the dead grant.
            raise AttemptError(Phase.TOKEN, Reply(535, f"5.7.8 {exc}")) from None
        # The XOAUTH2 client response is base64 of the whole string, not of the token alone.
        redactor.add_secret(f"user={account.username}\x01auth=Bearer {token.value}\x01\x01")
        return Credential(account.username, token.value, Mechanism.XOAUTH2, token)

    def rejected(self, account: AccountConfig, credential: Credential) -> None:
        if credential.token is not None and self.tokens is not None:
            self.tokens.rejected(account, credential.token)
