"""The ``alerts:`` block, at the top level and on a tenant (SPEC "Additions to commands").

The top-level block hears about everything; a tenant's own block hears about that tenant's
accounts too, so a tenant's admin learns that their mailbox is paused without the relay
operator forwarding it. An alert email is sent through ``via``, one of relayd's accounts:
for a tenant's block it must be an account of that tenant, because relayd never sends news
about a tenant through another tenant's mailbox. The webhook URL is a secret value: it often
carries a token in its path or query (Slack, Teams and Discord incoming webhooks do).
"""

from __future__ import annotations

from collections.abc import Callable

from relayd.config.model import AlertsConfig, Secret
from relayd.config.secrets import read_secret
from relayd.config.values import parse_address, parse_url
from relayd.config.yamlnodes import Item, NodeReader

__all__ = ["ALERTS_KEYS", "read_alerts"]

ALERTS_KEYS = ("via", "email", "webhook")
ADDRESS = "an address like user@example.com"


def read_alerts(
    rd: NodeReader,
    item: Item,
    owns: Callable[[str], bool],
    *,
    whose: str,
) -> AlertsConfig | None:
    """``owns``: whether an address is an account (or alias) that may send the alert emails;
    ``whose``: "any tenant" or "tenant NAME", for the errors."""
    if not item.present:
        return None
    f = rd.mapping(item, ALERTS_KEYS)
    via = rd.parsed(f["via"], parse_address, ADDRESS, trim=True)
    email = rd.parsed(f["email"], parse_address, ADDRESS, trim=True)
    webhook = _webhook(rd, f["webhook"])
    if via is not None and not owns(via):
        rd.error(f["via"].path, f["via"].line, f"{via} is not an account (or alias) of {whose}")
    if email is not None and not f["via"].present:
        rd.error(
            f["email"].path,
            f["email"].line,
            f"alert emails need via, an account of {whose} that sends them",
        )
    if not f["email"].present and not f["webhook"].present:
        rd.warn(item.path, item.line, "neither email nor webhook: alerts only go to the log")
    return AlertsConfig(via=via.lower() if via else None, email=email, webhook=webhook)


def _webhook(rd: NodeReader, item: Item) -> Secret | None:
    secret = read_secret(rd, item)
    if secret is None:
        return None
    try:
        parse_url(secret.reveal().strip(), allow_http=True)
    except ValueError:
        # Name the source, never the value: the URL's path may be the webhook's token.
        where = "the value" if secret.source == "literal" else secret.source
        rd.error(item.path, item.line, f"{where} is not an http(s) URL")
        return None
    return Secret(value=secret.reveal().strip(), source=secret.source)
