"""``relayd connect ADDRESS [--expires 24h]``: a single-use link for the mailbox owner.

The link is a file in the state directory (``relayd.web.links``), so this works whether the
daemon runs or not; opening it needs the web listener (``web:``) of a running daemon. The
token is printed once and kept nowhere: the state directory holds its hash.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime

from relayd.config import load_for_command
from relayd.config.model import AccountConfig
from relayd.config.yamlnodes import parse_duration
from relayd.core.routing import find_account
from relayd.web.links import DEFAULT_LIFETIME, LinkStore

__all__ = ["add_connect_arguments", "cmd_connect"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
#: Longer-lived links are more likely to be found in an old mail by someone else.
MAX_LIFETIME = 30 * 86400.0


def add_connect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("address", metavar="ADDRESS", help="the mailbox to connect")
    parser.add_argument(
        "--expires",
        metavar="DURATION",
        default="24h",
        help="how long the link stays valid (30m, 24h, 7d; default 24h, at most 30d)",
    )


def _error(text: str, code: int = EXIT_FAILED) -> int:
    print(f"error: {text}", file=sys.stderr)
    return code


def what_to_connect(account: AccountConfig) -> str | None:
    """What the owner does on the page, or None when there is nothing to connect."""
    if account.connect_password:
        return "enters an app password, which relayd tests before saving it"
    oauth = account.oauth
    if oauth is not None and account.password is None and oauth.flow == "delegated":
        return "signs in with the provider and allows relayd to send"
    return None


def cmd_connect(args: argparse.Namespace) -> int:
    """Print a single-use link that lets the mailbox owner connect the account."""
    config = load_for_command(getattr(args, "config", None))
    if config is None:
        return EXIT_USAGE
    try:
        lifetime = parse_duration(str(args.expires))
    except ValueError:
        return _error(
            f"--expires: expected a duration like 30m, 24h or 7d, got {args.expires!r}", EXIT_USAGE
        )
    if not 0 < lifetime <= MAX_LIFETIME:
        return _error("--expires: between 1 second and 30 days", EXIT_USAGE)
    if config.web is None:
        return _error(
            "the web listener is not configured: add web: {address: ..., public_url: ...} "
            'to the config (SPEC "Web")',
            EXIT_USAGE,
        )
    account = find_account(config, str(args.address))
    if account is None:
        return _error(f"{args.address} is not a configured account (see `relayd check-config`)")
    doing = what_to_connect(account)
    if doing is None:
        return _error(
            f"{account.address} has nothing to connect on the web page: it logs in with a "
            "configured password or the tenant's app-only credentials"
        )
    try:
        config.state_directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        token = LinkStore(config.state_directory).create(
            account.address, lifetime or DEFAULT_LIFETIME
        )
    except OSError as exc:
        return _error(
            f"cannot write {config.state_directory}/links: {exc.strerror or exc} "
            "(run as the relayd user or root)"
        )
    until = datetime.fromtimestamp(datetime.now().timestamp() + lifetime).strftime("%Y-%m-%d %H:%M")
    print(f"{config.web.public_url}/connect/{token}")
    print(
        f"Send this link to the owner of {account.address}, who opens it and {doing}. "
        f"It works once, until {until}.",
        file=sys.stderr,
    )
    return EXIT_OK
