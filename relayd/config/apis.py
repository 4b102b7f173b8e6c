"""The HTTP send APIs an account may use instead of SMTP (SPEC "Transports"): their default
endpoints, the OAuth scopes each needs and the largest message each can carry.

Facts as Microsoft and Google document them:

- Graph ``POST /v1.0/users/{id}/sendMail`` with the MIME as base64 text: delegated permission
  ``Mail.Send``, application permission ``Mail.Send`` through ``/.default``; requests are
  limited to 4 MB, so base64 (4 bytes for every 3) leaves 3 MB of MIME.
- Gmail ``POST /upload/gmail/v1/users/{id}/messages/send?uploadType=media``: scope
  ``gmail.send`` (a "sensitive", not a "restricted" scope as ``https://mail.google.com/`` is);
  media uploads up to 35 MB.
"""

from __future__ import annotations

from relayd.config.model import AccountConfig, Config, Limits, TransportKind

__all__ = [
    "DEFAULT_URLS",
    "GMAIL_API_SCOPES",
    "GRAPH_APP_SCOPES",
    "GRAPH_DELEGATED_SCOPES",
    "GRAPH_MAX_CONCURRENT",
    "GRAPH_REQUEST_LIMIT",
    "TRANSPORT_LABELS",
    "advertised_size",
    "base_limits",
    "max_mime_size",
    "size_limit",
    "transport_scopes",
]

DEFAULT_URLS = {
    TransportKind.GRAPH: "https://graph.microsoft.com",
    TransportKind.GMAIL_API: "https://gmail.googleapis.com",
}
TRANSPORT_LABELS = {
    TransportKind.SMTP: "SMTP",
    TransportKind.GRAPH: "Microsoft Graph sendMail",
    TransportKind.GMAIL_API: "the Gmail API",
}

GRAPH_DELEGATED_SCOPES = ("https://graph.microsoft.com/Mail.Send",)
GRAPH_APP_SCOPES = ("https://graph.microsoft.com/.default",)
GMAIL_API_SCOPES = ("https://www.googleapis.com/auth/gmail.send",)

# Graph: "The maximum request length supported is 4MB" (413); the body is base64 of the MIME.
GRAPH_REQUEST_LIMIT = 4 * 1024 * 1024
_GRAPH_MIME_LIMIT = GRAPH_REQUEST_LIMIT // 4 * 3
# Gmail API media upload: "Maximum file size: 35MB".
_GMAIL_MIME_LIMIT = 35 * 1024 * 1024


def transport_scopes(kind: TransportKind, flow: str) -> tuple[str, ...]:
    """The scopes an account of ``kind`` asks for when ``oauth.scopes`` is not set; () for
    SMTP, whose scopes are the OAuth family's own."""
    if kind is TransportKind.GRAPH:
        return GRAPH_APP_SCOPES if flow == "client_credentials" else GRAPH_DELEGATED_SCOPES
    if kind is TransportKind.GMAIL_API:
        return GMAIL_API_SCOPES
    return ()


def max_mime_size(kind: TransportKind) -> int | None:
    """The largest message (bytes of MIME) the transport can carry; None: no limit of its own."""
    if kind is TransportKind.GRAPH:
        return _GRAPH_MIME_LIMIT
    if kind is TransportKind.GMAIL_API:
        return _GMAIL_MIME_LIMIT
    return None


_WHY = {
    TransportKind.GRAPH: "Graph's 4 MB request limit, after base64",
    TransportKind.GMAIL_API: "the Gmail API's upload limit",
}


def size_limit(account: AccountConfig, spool_max: int) -> tuple[int, str | None]:
    """The largest message the account's route takes, and the 552 reply naming the limit and
    the transport when that is the transport's own (None: the spool's limit)."""
    own = max_mime_size(account.transport)
    if own is None or own >= spool_max:
        return spool_max, None
    label = TRANSPORT_LABELS[account.transport]
    reply = (
        f"552 5.3.4 Message too big for {label}: at most {own} bytes "
        f"({own / 2**20:g} MiB, {_WHY[account.transport]})"
    )
    return own, reply


def advertised_size(config: Config) -> int:
    """EHLO's SIZE (RFC 1870): the spool's limit, or less when every route is an API with
    a smaller one (before MAIL FROM the route is not known)."""
    spool_max = config.spool.max_message_size
    routes = [a for t in config.tenants for a in t.accounts]
    routes += [t.domain_account for t in config.tenants if t.domain_account is not None]
    if not routes:
        return spool_max
    return max(size_limit(a, spool_max)[0] for a in routes)


# Graph throttling: 4 concurrent requests per app and mailbox; 10,000 requests in 10 minutes.
GRAPH_MAX_CONCURRENT = 4


def base_limits(kind: TransportKind, preset: Limits) -> Limits:
    """The limits an account starts from before its config's own: the preset's are those of
    the provider's SMTP service (Microsoft: 3 sessions, 30 messages a minute), not its API's."""
    if kind is TransportKind.GRAPH:
        return Limits(max_connections=GRAPH_MAX_CONCURRENT, max_messages_per_minute=0)
    if kind is TransportKind.GMAIL_API:
        return Limits(max_connections=preset.max_connections, max_messages_per_minute=0)
    return preset
