"""Provider presets (SPEC "Provider presets"): the defaults a `provider:` fills in.

Hosts and ports are the providers' published submission and IMAP endpoints; limits and the
"files its own Sent copy" flag follow what the providers publish and do (Gmail and Exchange
Online file SMTP submissions in Sent themselves). Anything here can still be overridden in
the config, key by key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from relayd.config.model import ImapServer, Limits, SmtpServer, TlsMode

__all__ = [
    "APP_ONLY_FLOWS",
    "OAUTH_FLOWS",
    "PRESETS",
    "Preset",
]

#: Every `oauth.flow` relayd knows.
OAUTH_FLOWS = ("delegated", "client_credentials", "service_account", "refresh_token")
#: Flows whose credentials belong to the application, not to one mailbox: they can send as any
#: address of the tenant's domains (Microsoft SMTP.SendAsApp, Google domain-wide delegation).
APP_ONLY_FLOWS = frozenset({"client_credentials", "service_account"})


@dataclass(frozen=True)
class Preset:
    name: str
    smtp: SmtpServer | None  # None: the config must say (custom), or nothing is sent (capture)
    imap: ImapServer | None  # None: no IMAP unless the config gives one
    limits: Limits
    # Gmail files SMTP mail in "[Gmail]/Sent Mail"; Exchange Online files SMTP AUTH submissions
    # in Sent Items. Appending another copy there makes duplicates, so `sent_copy: auto` skips.
    files_sent_copy_itself: bool
    # "microsoft" (msal), "google" (google-auth) or "generic" (refresh-token grant at token_url)
    oauth_family: str
    oauth_flows: frozenset[str]
    requires_smtp: bool = False  # custom: there is no default server
    is_capture: bool = False  # a local Maildir instead of an upstream


def _smtp(host: str, port: int) -> SmtpServer:
    # Port rule of thumb: 465 = implicit TLS, 587 = STARTTLS.
    return SmtpServer(host, port, TlsMode.IMPLICIT if port == 465 else TlsMode.STARTTLS, None)


def _imap(host: str) -> ImapServer:
    return ImapServer(host, 993, TlsMode.IMPLICIT, None, None, None, None)


_GOOGLE_FLOWS = frozenset({"delegated", "service_account", "refresh_token"})
_MICROSOFT_FLOWS = frozenset({"delegated", "client_credentials", "refresh_token"})
_GENERIC_FLOWS = frozenset({"refresh_token"})

# Google Workspace: 100 recipients per message over SMTP.
_GOOGLE_LIMITS = Limits(max_connections=3, max_messages_per_minute=0, max_recipients=100)
# Microsoft 365: 3 concurrent SMTP AUTH connections per mailbox, 30 messages a minute.
_MICROSOFT_LIMITS = Limits(max_connections=3, max_messages_per_minute=30, max_recipients=0)


def _google(name: str) -> Preset:
    return Preset(
        name=name,
        smtp=_smtp("smtp.gmail.com", 465),
        imap=_imap("imap.gmail.com"),
        limits=_GOOGLE_LIMITS,
        files_sent_copy_itself=True,
        oauth_family="google",
        oauth_flows=_GOOGLE_FLOWS,
    )


def _microsoft(name: str) -> Preset:
    return Preset(
        name=name,
        smtp=_smtp("smtp.office365.com", 587),
        imap=_imap("outlook.office365.com"),
        limits=_MICROSOFT_LIMITS,
        files_sent_copy_itself=True,
        oauth_family="microsoft",
        oauth_flows=_MICROSOFT_FLOWS,
    )


def _app_password(name: str, smtp: str, smtp_port: int, imap: str) -> Preset:
    return Preset(
        name=name,
        smtp=_smtp(smtp, smtp_port),
        imap=_imap(imap),
        limits=Limits(),
        files_sent_copy_itself=False,
        oauth_family="generic",
        oauth_flows=_GENERIC_FLOWS,
    )


PRESETS: Mapping[str, Preset] = MappingProxyType(
    {
        "gmail": _google("gmail"),
        "google-workspace": _google("google-workspace"),
        "microsoft365": _microsoft("microsoft365"),
        "outlook": _microsoft("outlook"),
        # iCloud accepts app-specific passwords only (no OAuth for third-party mail clients).
        "icloud": Preset(
            name="icloud",
            smtp=_smtp("smtp.mail.me.com", 587),
            imap=_imap("imap.mail.me.com"),
            limits=Limits(),
            files_sent_copy_itself=False,
            oauth_family="generic",
            oauth_flows=frozenset(),
        ),
        "yahoo": _app_password("yahoo", "smtp.mail.yahoo.com", 465, "imap.mail.yahoo.com"),
        "fastmail": _app_password("fastmail", "smtp.fastmail.com", 465, "imap.fastmail.com"),
        # Zoho's EU/IN/AU data centres have their own hosts (smtp.zoho.eu, ...): override smtp.host.
        "zoho": _app_password("zoho", "smtp.zoho.com", 465, "imap.zoho.com"),
        "custom": Preset(
            name="custom",
            smtp=None,
            imap=None,
            limits=Limits(),
            files_sent_copy_itself=False,
            oauth_family="generic",
            oauth_flows=_GENERIC_FLOWS,
            requires_smtp=True,
        ),
        "capture": Preset(
            name="capture",
            smtp=None,
            imap=None,
            limits=Limits(),
            files_sent_copy_itself=False,
            oauth_family="generic",
            oauth_flows=frozenset(),
            is_capture=True,
        ),
    }
)
