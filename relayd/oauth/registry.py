"""``TokenSources``: a valid access token for an account, now — with one refresh at a time.

The registry picks the provider an account's ``oauth`` calls for (importing msal or google-auth
only then: together they cost ~20 MB of an otherwise ~27 MB daemon), keeps the access tokens
it got in memory, and refreshes:

- when less than ``REFRESH_MARGIN`` (10 minutes) remain — the libraries' own margins are
  shorter and are never relied on;
- once per credential even with many messages waiting: one ``asyncio.Lock`` per token key
  (an account; or a tenant's app for client credentials, whose one token serves every
  mailbox), and whoever waited behind the refresh finds the new token;
- in a worker thread, since msal and google-auth block.

Stored refresh tokens (delegated and generic flows) live in the encrypted ``TokenStore``; a
rotated one is written back atomically under the account's file lock, unless a new consent
(``relayd auth``) replaced the file meanwhile — the newer consent wins.

In fleet mode the fleet's token row (``relayd.fleet.tokens``) is the record: the refresh
happens under the account's fleet-wide lock and its result is written in the same
transaction, then copied to the local file, which serves while the database is unreachable.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from relayd.config.model import AccountConfig, Config, OAuthConfig
from relayd.fleet.errors import FleetUnavailable
from relayd.log import redactor
from relayd.metrics import TOKEN_REFRESHES
from relayd.oauth.store import StoredTokens, TokenStore, TokenStoreError
from relayd.oauth.tokens import (
    REFRESH_MARGIN,
    AccessToken,
    ConsentRequired,
    Grant,
    TokenEndpointUnavailable,
    needs_refresh,
)

if TYPE_CHECKING:  # the driver is imported only when fleet mode is on
    from relayd.fleet.tokens import FleetTokens

__all__ = [
    "TokenProvider",
    "TokenSources",
    "config_seed_id",
    "provider_for",
    "token_sources_for",
]

log = logging.getLogger(__name__)


class TokenProvider(Protocol):
    key: str  # what one token (and one refresh lock) belongs to
    stores_tokens: bool  # True: refresh token in the TokenStore

    def refresh(self, refresh_token: str | None) -> Grant:
        """Blocking; raises ConsentRequired or TokenEndpointUnavailable."""
        ...


def provider_for(account: AccountConfig) -> TokenProvider:
    """The provider for the account's flow and provider family (lazy library imports)."""
    oauth = account.oauth
    assert oauth is not None
    family = _family(account.provider)
    if oauth.flow == "refresh_token":
        from relayd.oauth.generic import GenericRefresh

        return GenericRefresh(oauth, account.address)
    if family == "microsoft":
        from relayd.oauth.microsoft import MicrosoftAppOnly, MicrosoftDelegated

        if oauth.flow == "client_credentials":
            return MicrosoftAppOnly(oauth, account.address)
        return MicrosoftDelegated(oauth, account.address)
    if family == "google":
        from relayd.oauth.google import GoogleServiceAccount, GoogleUser

        if oauth.flow == "service_account":
            return GoogleServiceAccount(oauth, account.address)
        return GoogleUser(oauth, account.address)
    from relayd.oauth.generic import GenericRefresh

    return GenericRefresh(oauth, account.address)


def _family(provider: str) -> str:
    from relayd.config.presets import PRESETS

    preset = PRESETS.get(provider)
    return preset.oauth_family if preset is not None else "generic"


def _digest(oauth: OAuthConfig) -> str:
    """Changes whenever anything of the registration changes, secrets included."""
    h = hashlib.sha256(repr(oauth).encode())
    for secret in (
        oauth.client_secret,
        oauth.certificate,
        oauth.service_account_key,
        oauth.refresh_token,
    ):
        h.update(b"\0" + (secret.reveal().encode() if secret is not None else b"-"))
    return h.hexdigest()


def config_seed_id(oauth: OAuthConfig) -> str:
    """The consent id of a refresh token written in the config (not by ``relayd auth``)."""
    assert oauth.refresh_token is not None
    return "config-" + hashlib.sha256(oauth.refresh_token.reveal().encode()).hexdigest()[:16]


class TokenSources:
    def __init__(
        self,
        store: TokenStore,
        *,
        clock: Callable[[], float] = time.time,
        margin: float = REFRESH_MARGIN,
        on_secret: Callable[[str], None] = redactor.add_secret,
        fleet: FleetTokens | None = None,
    ) -> None:
        self.store = store
        self.fleet = fleet
        self.clock = clock
        self.margin = margin
        self.on_secret = on_secret
        self._providers: dict[tuple[str, str], TokenProvider] = {}
        self._shared: dict[tuple[str, str], TokenProvider] = {}  # by (token key, digest)
        self._locks: dict[str, asyncio.Lock] = {}
        self._tokens: dict[str, AccessToken] = {}
        self._records: dict[str, StoredTokens] = {}
        self._rejected: deque[str] = deque(maxlen=64)

    # -- the question -------------------------------------------------------------------

    async def access_token(self, account: AccountConfig) -> AccessToken:
        provider = self._provider(account)
        lock = self._locks.setdefault(provider.key, asyncio.Lock())
        async with lock:
            token = self._tokens.get(provider.key)
            if self._usable(token):
                assert token is not None
                return token
            record: StoredTokens | None = None
            refresh_token: str | None = None
            if provider.stores_tokens and self.fleet is not None and self.fleet.available:
                try:
                    return await self._from_fleet(account, provider, self.fleet)
                except FleetUnavailable:
                    pass  # the local record serves (its copy of the fleet's)
            if provider.stores_tokens:
                record = await asyncio.to_thread(self._stored, account)
                if record is None and self.fleet is not None:
                    # The consent may well be in the fleet database, out of reach now: wait
                    # for it rather than pause the account.
                    raise TokenEndpointUnavailable(
                        "the fleet database is unreachable and this host has no copy of the "
                        "account's tokens yet"
                    )
                assert account.oauth is not None
                if record is not None and record.consented_to_other_scopes(account.oauth.scopes):
                    raise ConsentRequired(_other_scopes(account, record), error="other_scopes")
                for secret in (record.access_token, record.refresh_token) if record else ():
                    if secret:
                        self.on_secret(secret)
                if record is not None and record.access_token:
                    stored = AccessToken(record.access_token, record.expires_at)
                    if self._usable(stored):
                        # Fresh enough from an earlier run or from `relayd auth`: no refresh.
                        self._tokens[provider.key] = stored
                        return stored
                refresh_token = record.refresh_token if record is not None else None
            grant = await self._refresh(account, provider, refresh_token)
            if provider.stores_tokens:
                await asyncio.to_thread(self._keep_rotation, account, record, grant)
            token = grant.access
            self._tokens[provider.key] = token
            log.info(
                "access token refreshed (valid for %d min)",
                max(0, int(token.remaining(self.clock()) // 60)),
                extra={"account": account.address},
            )
            return token

    async def _from_fleet(
        self, account: AccountConfig, provider: TokenProvider, fleet: FleetTokens
    ) -> AccessToken:
        """The token through the fleet's row, refreshed (if need be) under its fleet-wide
        lock; FleetUnavailable before anything was refreshed, so the caller goes local."""
        address = account.address
        refreshed: StoredTokens | None = None
        try:
            async with fleet.locked(address) as row:
                local = await asyncio.to_thread(self._stored, account)
                if row.sealed == b"":  # revoked on some host of the fleet
                    if local is None or local.updated_at <= row.updated_at:
                        await asyncio.to_thread(self._drop_local, address)
                        raise ConsentRequired(
                            f"the tokens of {address} were revoked on a host of the fleet; "
                            f"run `relayd auth {address}`"
                        )
                    shared = None  # a consent given here since, while the database was away
                else:
                    shared = self._open_row(address, row.sealed)
                record = shared
                if local is not None and (shared is None or local.updated_at > shared.updated_at):
                    # Newer here: a consent given or a rotation made while the database was
                    # out of reach. It becomes the fleet's.
                    record = local
                if record is None:
                    raise ConsentRequired(
                        f"no tokens stored for {address}; run `relayd auth {address}` on any "
                        "host of the fleet"
                    )
                assert account.oauth is not None
                if record.consented_to_other_scopes(account.oauth.scopes):
                    raise ConsentRequired(_other_scopes(account, record), error="other_scopes")
                for secret in (record.access_token, record.refresh_token):
                    if secret:
                        self.on_secret(secret)
                if record.access_token:
                    stored = AccessToken(record.access_token, record.expires_at)
                    if self._usable(stored):
                        if record is not shared:
                            await row.write(
                                self.store.seal_record(record), record.consent_id, record.updated_at
                            )
                        await asyncio.to_thread(self._mirror, record)
                        self._tokens[provider.key] = stored
                        return stored
                grant = await self._refresh(account, provider, record.refresh_token)
                refreshed = record.rotated(
                    grant.access_token, grant.expires_at, grant.refresh_token, self.clock()
                )
                await row.write(
                    self.store.seal_record(refreshed), refreshed.consent_id, refreshed.updated_at
                )
        except FleetUnavailable:
            if refreshed is None:
                raise
            # Refreshed, but the database went away before the commit: the rotated refresh
            # token lives on here (and reaches the fleet as the newer record later).
            log.warning(
                "fleet database lost while saving refreshed tokens; kept on this host",
                extra={"account": address},
            )
        assert refreshed is not None
        await asyncio.to_thread(self._mirror, refreshed)
        token = AccessToken(refreshed.access_token or "", refreshed.expires_at)
        self._tokens[provider.key] = token
        log.info(
            "access token refreshed for the fleet (valid for %d min)",
            max(0, int(token.remaining(self.clock()) // 60)),
            extra={"account": address},
        )
        return token

    async def _refresh(
        self, account: AccountConfig, provider: TokenProvider, refresh_token: str | None
    ) -> Grant:
        try:
            grant = await asyncio.to_thread(provider.refresh, refresh_token)
        except ConsentRequired:
            TOKEN_REFRESHES.inc(account=account.address, result="consent-required")
            raise
        except TokenEndpointUnavailable:
            TOKEN_REFRESHES.inc(account=account.address, result="unavailable")
            raise
        TOKEN_REFRESHES.inc(account=account.address, result="ok")
        for secret in (grant.access_token, grant.refresh_token):
            if secret:
                self.on_secret(secret)
        return grant

    def _open_row(self, address: str, sealed: bytes | None) -> StoredTokens | None:
        if sealed is None:
            return None
        try:
            return self.store.open_record(address, sealed)
        except TokenStoreError as exc:
            log.error("%s; using this host's copy", exc, extra={"account": address})
            return None

    def _drop_local(self, address: str) -> None:
        try:
            self.store.remove(address)
        except TokenStoreError as exc:
            log.error("could not delete this host's copy of revoked tokens: %s", exc)
        self._records.pop(address, None)

    def _mirror(self, record: StoredTokens) -> None:
        """The fleet's record, copied to this host's token file (for a database outage)."""

        def change(current: StoredTokens | None) -> StoredTokens | None:
            if current is not None and current.to_json() == record.to_json():
                return None
            return record

        try:
            self.store.update(record.address, change)
        except TokenStoreError as exc:
            log.error("could not keep a local copy of the tokens: %s", exc)
        self._records[record.address] = record

    def rejected(self, account: AccountConfig, token: AccessToken) -> None:
        """RFC 6750 §3.1 invalid_token: never offer this token again; refresh next time."""
        self._rejected.append(token.value)
        key = self._provider(account).key
        if self._tokens.get(key) == token:
            del self._tokens[key]

    def _usable(self, token: AccessToken | None) -> bool:
        return (
            token is not None
            and token.value not in self._rejected
            and not needs_refresh(token, self.clock(), self.margin)
        )

    # -- the store ----------------------------------------------------------------------

    def _stored(self, account: AccountConfig) -> StoredTokens | None:
        """The account's record: memory, else the store, else the config's refresh token."""
        address = account.address
        oauth = account.oauth
        assert oauth is not None
        record = self._records.get(address)
        if record is None:
            try:
                record = self.store.load(address)
            except TokenStoreError as exc:
                raise ConsentRequired(
                    f"{exc}; restore the key or run `relayd auth {address}`",
                    error="unreadable_store",
                ) from None
        seed = oauth.refresh_token
        if seed is not None:
            seed_id = config_seed_id(oauth)
            # A refresh token changed in the config replaces one rotated from an older config
            # value; one obtained by `relayd auth` is newer than any config value.
            if record is None or (
                record.consent_id.startswith("config-") and record.consent_id != seed_id
            ):
                record = StoredTokens(
                    address=address,
                    flow=oauth.flow,
                    refresh_token=seed.reveal(),
                    consent_id=seed_id,
                )
        if record is not None:
            self._records[address] = record
        return record

    def _keep_rotation(
        self, account: AccountConfig, used: StoredTokens | None, grant: Grant
    ) -> None:
        assert used is not None  # a stored-token flow refreshed with some record's token
        now = self.clock()
        new = used.rotated(grant.access_token, grant.expires_at, grant.refresh_token, now)

        def change(current: StoredTokens | None) -> StoredTokens | None:
            if current is not None and current.consent_id != used.consent_id:
                return None  # `relayd auth` wrote a newer consent meanwhile: it wins
            if current is None and not used.consent_id.startswith("config-"):
                # Stored tokens gone while this refresh ran: `relayd auth --revoke` deleted
                # them, and a refresh finishing late must not bring them back.
                return None
            return new

        try:
            on_disk = self.store.update(account.address, change)
        except TokenStoreError as exc:
            # The tokens still work; keep the rotated refresh token in memory so the next
            # refresh uses it, and say loudly that a restart now would need the old one.
            log.error(
                "could not save rotated tokens (%s); keeping them in memory",
                exc,
                extra={"account": account.address},
            )
            self._records[account.address] = new
            return
        if on_disk is None and not used.consent_id.startswith("config-"):
            self._records.pop(account.address, None)  # revoked meanwhile: forget it here too
            return
        self._records[account.address] = on_disk if on_disk is not None else new

    def consent_id(self, account: AccountConfig) -> str:
        """Changes with each new consent (`relayd auth`), not with routine rotations."""
        if account.oauth is None or account.password is not None:
            return ""
        try:
            record = self.store.load(account.address)
        except TokenStoreError:
            return "unreadable"
        return record.consent_id if record is not None else ""

    def use_store(self, store: TokenStore) -> None:
        """Another store (``tokens.key`` changed at a reload): nothing cached is kept."""
        self.store = store
        self.forget()

    def forget(self) -> None:
        """The store changed under us (`relayd auth`): read it again on the next request."""
        self._records.clear()
        self._tokens = {k: v for k, v in self._tokens.items() if not k.startswith("delegated:")}

    def _provider(self, account: AccountConfig) -> TokenProvider:
        assert account.oauth is not None
        digest = _digest(account.oauth)
        ident = (account.address, digest)
        provider = self._providers.get(ident)
        if provider is None:
            built = provider_for(account)
            # Mailboxes under one app registration share its provider (and msal application).
            provider = self._shared.setdefault((built.key, digest), built)
            self._providers[ident] = provider
        return provider


def token_sources_for(config: Config, *, fsync: bool = True) -> TokenSources:
    """The token sources of ``config``'s state directory and ``tokens.key``."""
    return TokenSources(TokenStore(config.state_directory, key=config.tokens_key, fsync=fsync))


def _other_scopes(account: AccountConfig, record: StoredTokens) -> str:
    """Why tokens consented for one resource are not offered to another: the fix."""
    assert account.oauth is not None
    was = " ".join(record.scopes or ()) or "the provider's SMTP and IMAP scopes"
    now = " ".join(account.oauth.scopes) or "the provider's SMTP and IMAP scopes"
    label = {"graph": " for Graph", "gmail_api": " for the Gmail API"}.get(
        account.transport.value, " for SMTP"
    )
    return (
        f"the stored consent was given for {was}, but transport {account.transport.value} "
        f"needs {now}: run `relayd auth {account.address}` again{label}"
    )
