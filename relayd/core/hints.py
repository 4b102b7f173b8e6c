"""Human hints for the provider replies worth explaining (as Microsoft and Google document
them): pure text.

Used by ``relayd test``, ``relayd status`` and the web connect page so that "535 5.7.139"
comes with what to do about it, not just the code.
"""

from __future__ import annotations

import re

__all__ = ["hint_for"]

_CODE = re.compile(r"\b([245]\d\d)(?:[ -]+([245]\.\d{1,3}\.\d{1,3}))?")

# (basic code, enhanced code or None for any) → hint. First match wins.
_HINTS: tuple[tuple[str, str | None, str], ...] = (
    (
        "535",
        "5.7.139",
        "Microsoft 365 refuses SMTP AUTH for this mailbox: SMTP AUTH is disabled for the "
        "tenant or the mailbox, or security defaults block it. Enable 'Authenticated SMTP' "
        "for the mailbox in the Microsoft 365 admin center, or send through Microsoft Graph "
        "instead, which needs no SMTP AUTH: `transport: graph` on the account or tenant (OAuth "
        "with the Graph Mail.Send permission; then `relayd auth ADDRESS` for a delegated "
        "account).",
    ),
    (
        "534",
        "5.7.9",
        "Gmail wants an application-specific password: turn on 2-Step Verification for the "
        "Google account, create an app password, and put it in the account's password.",
    ),
    (
        "530",
        "5.7.57",
        "The client was not authenticated to send (Microsoft 365): the login did not happen "
        "or did not take; check the username and that SMTP AUTH is enabled for the mailbox.",
    ),
    (
        "554",
        "5.2.252",
        "SendAsDenied: the mailbox may not send as this sender address. Grant 'Send As' on "
        "the address to the mailbox (Exchange admin center, or Add-RecipientPermission), or "
        "send as the mailbox's own address.",
    ),
    (
        "535",
        None,
        "The provider refused the username or password. Check the account's username; for "
        "Gmail, iCloud, Yahoo, Fastmail and Zoho this must be an app password, not the "
        "password of the web login.",
    ),
    (
        "421",
        None,
        "The server is throttling or closing the connection: relayd slows down and retries; "
        "if it persists, lower limits.max_messages_per_minute or max_connections.",
    ),
    (
        "454",
        None,
        "Temporary refusal, usually throttling ('Too many login attempts'): relayd keeps "
        "connections open to avoid repeated logins and retries later; lower "
        "limits.max_connections if it persists.",
    ),
)


def hint_for(reply: str) -> str | None:
    """The hint for the first reply code in ``reply``, or None."""
    found = _CODE.search(reply)
    if found is None:
        return None
    code, enhanced = found.group(1), found.group(2)
    for hint_code, hint_enhanced, text in _HINTS:
        if code == hint_code and (hint_enhanced is None or hint_enhanced == enhanced):
            return text
    return None
