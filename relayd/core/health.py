"""Account health: the pause rule and the unhealthy-upstream rule, as pure transitions.

SPEC "Delivery": credentials refused on two consecutive attempts pause the account (mail
held, one alert); a paused account is probed with a login alone every ``retry.max`` and
resumes when a probe succeeds, when its credentials change, or on release. An upstream that
keeps failing at the network/TLS level is marked unhealthy: its mail waits without attempts
until the next probe time, so it never slows other accounts.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from relayd.config.model import AccountConfig

__all__ = [
    "PAUSE_AFTER_REFUSALS",
    "UNHEALTHY_AFTER_FAILURES",
    "AccountHealth",
    "AccountState",
    "credentials_fingerprint",
]

PAUSE_AFTER_REFUSALS = 2
UNHEALTHY_AFTER_FAILURES = 3


class AccountState(enum.Enum):
    OK = "ok"
    DEFERRED = "deferred"  # last attempt failed temporarily
    UNHEALTHY = "unhealthy"  # repeated network/TLS failures: waiting for the next probe
    PAUSED = "paused"  # credentials refused: mail held until fixed


@dataclass(frozen=True)
class AccountHealth:
    address: str
    state: AccountState = AccountState.OK
    reason: str = ""
    credential_refusals: int = 0  # consecutive
    connection_failures: int = 0  # consecutive
    paused_at: float | None = None
    alerted_at: float | None = None
    retry_at: float = 0.0  # unhealthy/paused: no attempt before this
    last_success_at: float | None = None
    last_error_at: float | None = None
    last_error: str = ""
    credentials_fingerprint: str = ""
    # Paused by the operator (web operator page): only a release resumes it, not a probe
    # or new credentials.
    operator_paused: bool = False
    # Paused because the provider refused a permission (an HTTP API's 403): not probed, as
    # a token alone cannot show the permission is there now; release or new credentials.
    needs_admin: bool = False
    # Fleet mode: the host whose attempts paused the account, when it was another. That
    # host probes and alerts; this one holds the mail and waits for the fleet's resume.
    paused_by: str = ""

    @property
    def paused(self) -> bool:
        return self.state is AccountState.PAUSED

    def accepting_attempts(self, now: float) -> bool:
        if self.state is AccountState.PAUSED:
            return False
        return not (self.state is AccountState.UNHEALTHY and now < self.retry_at)

    def on_success(self, now: float) -> AccountHealth:
        base = self if self.is_clear else self.on_released()
        return replace(base, last_success_at=now)

    @property
    def is_clear(self) -> bool:
        """Nothing to release: what ``on_released`` returns (cheaper to ask than to build,
        and asked after every delivered message)."""
        return (
            self.state is AccountState.OK
            and not self.reason
            and not self.credential_refusals
            and not self.connection_failures
            and self.paused_at is None
            and self.alerted_at is None
            and not self.retry_at
            and not self.operator_paused
            and not self.needs_admin
            and not self.paused_by
        )

    def on_credentials_refused(self, now: float, reply: str, probe_after: float) -> AccountHealth:
        refusals = self.credential_refusals + 1
        changed = replace(
            self,
            credential_refusals=refusals,
            connection_failures=0,
            last_error_at=now,
            last_error=reply,
        )
        if refusals >= PAUSE_AFTER_REFUSALS:
            return replace(
                changed,
                state=AccountState.PAUSED,
                reason=f"credentials refused: {reply}",
                paused_at=self.paused_at or now,
                retry_at=now + probe_after,
            )
        return replace(changed, state=AccountState.DEFERRED, reason=reply)

    def on_permission_refused(self, now: float, detail: str) -> AccountHealth:
        return replace(
            self,
            state=AccountState.PAUSED,
            reason=detail,
            connection_failures=0,
            paused_at=self.paused_at or now,
            retry_at=0.0,
            last_error_at=now,
            last_error=detail,
            needs_admin=True,
        )

    def on_connection_failure(self, now: float, detail: str, retry_after: float) -> AccountHealth:
        if self.state is AccountState.PAUSED:
            return replace(self, last_error_at=now, last_error=detail)
        failures = self.connection_failures + 1
        state = (
            AccountState.UNHEALTHY
            if failures >= UNHEALTHY_AFTER_FAILURES
            else AccountState.DEFERRED
        )
        return replace(
            self,
            state=state,
            reason=detail,
            connection_failures=failures,
            retry_at=now + retry_after if state is AccountState.UNHEALTHY else 0.0,
            last_error_at=now,
            last_error=detail,
        )

    def on_throttled(self, now: float, reply: str) -> AccountHealth:
        """The provider asked to slow down: neither a login that worked nor one refused, so
        the refusal streak stands, and nothing is wrong with the upstream either."""
        if self.state is AccountState.PAUSED:
            return replace(self, last_error_at=now, last_error=reply)
        return replace(
            self,
            state=AccountState.DEFERRED,
            reason=f"throttled by the provider: {reply}",
            last_error_at=now,
            last_error=reply,
        )

    def on_message_failure(self, now: float, reply: str) -> AccountHealth:
        """A 4xx/5xx about one message: the account itself is fine (login worked)."""
        return replace(
            self,
            state=AccountState.OK if self.state is not AccountState.PAUSED else self.state,
            credential_refusals=0,
            connection_failures=0,
            last_error_at=now,
            last_error=reply,
        )

    def on_released(self) -> AccountHealth:
        return replace(
            self,
            state=AccountState.OK,
            reason="",
            credential_refusals=0,
            connection_failures=0,
            paused_at=None,
            alerted_at=None,
            retry_at=0.0,
            operator_paused=False,
            needs_admin=False,
            paused_by="",
        )

    def on_paused_by_operator(self, now: float) -> AccountHealth:
        """The operator holds the account's mail until they release it; no alert (they know)
        and no probe (nothing is wrong with the credentials)."""
        return replace(
            self,
            state=AccountState.PAUSED,
            reason="paused by the operator",
            paused_at=self.paused_at or now,
            alerted_at=self.alerted_at or now,
            retry_at=0.0,
            operator_paused=True,
        )

    def on_paused_elsewhere(self, now: float, reason: str, host: str) -> AccountHealth:
        """Another host of the fleet paused the account: its mail is held here too, with no
        login of this host's own (the other host probes) and no second alert."""
        if self.paused:
            return self
        return replace(
            self,
            state=AccountState.PAUSED,
            reason=f"paused on {host}: {reason}" if reason else f"paused on {host}",
            paused_at=now,
            alerted_at=now,
            retry_at=0.0,
            paused_by=host,
        )

    def on_credentials_changed(self, fingerprint: str) -> AccountHealth:
        """New password or token: a paused account gets a fresh chance (SPEC resume rule),
        unless the operator paused it."""
        if fingerprint == self.credentials_fingerprint:
            return self
        resumed = self.on_released() if self.paused and not self.operator_paused else self
        return replace(resumed, credentials_fingerprint=fingerprint)

    def but_alerted(self, now: float) -> AccountHealth:
        return replace(self, alerted_at=now)

    def with_retry_at(self, when: float) -> AccountHealth:
        return replace(self, retry_at=when)

    def differs_only_in_success(self, other: AccountHealth) -> bool:
        return all(getattr(self, name) == getattr(other, name) for name in _ALL_BUT_SUCCESS)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = self.state.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AccountHealth:
        data = dict(data)
        data["state"] = AccountState(data.get("state", "ok"))
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


_ALL_BUT_SUCCESS = tuple(f.name for f in fields(AccountHealth) if f.name != "last_success_at")


def credentials_fingerprint(account: AccountConfig, consent: str = "") -> str:
    """Changes when the configured credentials change; reveals nothing usable about them.

    ``consent`` identifies the OAuth consent in the token store (or the app password given
    on the connect page): a new ``relayd auth`` or connect changes it (and resumes a paused
    account), a routine token rotation does not.
    """
    h = hashlib.sha256(b"relayd-credentials\0")
    h.update(account.username.encode())
    if account.password is not None:
        h.update(b"\0password\0" + account.password.reveal().encode())
    if account.connect_password:
        # The password given on the connect page: a new one comes with a new consent id.
        h.update(b"\0connected\0" + consent.encode())
    if account.oauth is not None:
        h.update(b"\0oauth\0" + repr(account.oauth).encode())
        # repr() hides secret values: a new client secret or refresh token must count too.
        for secret in (
            account.oauth.client_secret,
            account.oauth.certificate,
            account.oauth.service_account_key,
            account.oauth.refresh_token,
        ):
            if secret is not None:
                h.update(b"\0" + secret.reveal().encode())
        h.update(b"\0consent\0" + consent.encode())
    return h.hexdigest()[:24]
