"""Where an upstream login gets its credential: the app password, or an OAuth2 access token.

Token errors are mapped here, at the boundary, into what ``relayd.core.outcome`` classifies:
an unreachable or failing token endpoint is a network ``Failure`` (deferred, tokens kept); a
refused grant (``invalid_grant``) or no consent yet is a ``Failure`` of kind ``CONSENT``,
which counts as credentials refused (held, then paused) and carries the hint to run
``relayd auth``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

from relayd.config.model import AccountConfig
from relayd.core.outcome import Failure, FailureKind, Phase
from relayd.log import redactor
from relayd.oauth.passwords import ConnectedPasswords
from relayd.oauth.sealed import SealedFilesError
from relayd.oauth.tokens import AccessToken, ConsentRequired, TokenEndpointUnavailable, TokenSource
from relayd.upstream.transport import AttemptError

__all__ = ["AccountCredentials", "Credential", "CredentialSource", "Mechanism"]


class Mechanism(enum.Enum):
    PASSWORD = "password"  # AUTH PLAIN/LOGIN with an (app) password
    XOAUTH2 = "xoauth2"  # AUTH XOAUTH2 with an OAuth2 access token


@dataclass(frozen=True)
class Credential:
    """What one login needs; ``repr`` never shows the secret."""

    username: str
    secret: str = field(repr=False)
    mechanism: Mechanism
    token: AccessToken | None = field(default=None, repr=False)


class CredentialSource(Protocol):
    async def obtain(self, account: AccountConfig) -> Credential:
        """The credential to log in with now; raises AttemptError(Phase.TOKEN, ...) when
        none can be had (token endpoint down: a network Failure; no consent: a CONSENT
        Failure)."""
        ...

    def rejected(self, account: AccountConfig, credential: Credential) -> None:
        """The server refused ``credential``: do not offer it again."""
        ...


class AccountCredentials:
    """The daemon's ``CredentialSource``: the app password (configured, or given on the
    connect page), else a token from the registry."""

    def __init__(
        self, tokens: TokenSource | None = None, passwords: ConnectedPasswords | None = None
    ) -> None:
        self.tokens = tokens
        self.passwords = passwords

    async def obtain(self, account: AccountConfig) -> Credential:
        if account.password is not None:
            return Credential(account.username, account.password.reveal(), Mechanism.PASSWORD)
        if account.connect_password:
            return Credential(account.username, await self._connected(account), Mechanism.PASSWORD)
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
            # Said by relayd or the token endpoint, not by the mail server: no SMTP reply is
            # made up for it. Held like refused credentials (SPEC "held": invalid_grant).
            raise AttemptError(
                Phase.TOKEN, Failure(Phase.TOKEN, FailureKind.CONSENT, str(exc))
            ) from None
        # The XOAUTH2 client response is base64 of the whole string, not of the token alone.
        redactor.add_secret(f"user={account.username}\x01auth=Bearer {token.value}\x01\x01")
        return Credential(account.username, token.value, Mechanism.XOAUTH2, token)

    async def _connected(self, account: AccountConfig) -> str:
        """The password the owner gave on the connect page. None yet is what a missing OAuth
        consent is, and said by relayd, not by the mail server: a consent failure (held,
        then paused), with no SMTP reply made up for it."""
        fix = f"send the mailbox owner a link from `relayd connect {account.address}`"
        try:
            password = await self.passwords.password(account) if self.passwords else None
        except SealedFilesError as exc:
            raise AttemptError(
                Phase.TOKEN, Failure(Phase.TOKEN, FailureKind.CONSENT, f"{exc}; {fix}")
            ) from None
        if password is None:
            raise AttemptError(
                Phase.TOKEN,
                Failure(Phase.TOKEN, FailureKind.CONSENT, f"no app password connected yet; {fix}"),
            )
        return password

    def rejected(self, account: AccountConfig, credential: Credential) -> None:
        if credential.token is not None and self.tokens is not None:
            self.tokens.rejected(account, credential.token)
