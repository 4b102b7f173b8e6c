"""``relayd auth ADDRESS [--device-code|--browser|--no-browser]``: consent once, store, say
what happens next.

The result goes into the encrypted token store with a new consent id. A running daemon sees
the store change within seconds (it polls the token directory), which changes the account's
credentials fingerprint: a paused account resumes and its held mail goes out by itself.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import time

from relayd.config import load_for_command
from relayd.config.model import AccountConfig, Config
from relayd.config.presets import APP_ONLY_FLOWS, PRESETS
from relayd.core.routing import find_account
from relayd.oauth import flows
from relayd.oauth.store import StoredTokens, TokenStore, TokenStoreError, new_consent_id
from relayd.oauth.tokens import TokenError

__all__ = ["add_auth_arguments", "cmd_auth", "save_consent"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_auth_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("address", metavar="ADDRESS", help="the mailbox to consent for")
    how = parser.add_mutually_exclusive_group()
    how.add_argument(
        "--device-code",
        dest="method",
        action="store_const",
        const="device-code",
        help="show a code to enter on any device (Microsoft; works over SSH)",
    )
    how.add_argument(
        "--browser",
        dest="method",
        action="store_const",
        const="browser",
        help="open a browser here, which returns to a loopback address",
    )
    how.add_argument(
        "--no-browser",
        dest="method",
        action="store_const",
        const="no-browser",
        help="no browser on this machine: device code (Microsoft) or paste the "
        "redirected address back (Google)",
    )


def save_consent(
    store: TokenStore, account: AccountConfig, outcome: flows.ConsentResult
) -> StoredTokens:
    """Store a new consent (``relayd auth``, or the web connect page): the tokens with a new
    consent id, which a running daemon notices in the store and resumes the account for."""
    assert account.oauth is not None
    record = StoredTokens(
        address=account.address,
        flow=account.oauth.flow,
        refresh_token=outcome.refresh_token,
        access_token=outcome.access_token or None,
        expires_at=outcome.expires_at,
        consent_id=new_consent_id(),
        updated_at=time.time(),
    )
    store.update(account.address, lambda _old: record)
    return record


def _say(text: str) -> None:
    print(text, flush=True)


def _ask_visible(prompt: str) -> str:
    if sys.stdin.isatty():
        return input(prompt)
    print(prompt, flush=True)
    return sys.stdin.readline()


def _ask_hidden(prompt: str) -> str:
    if sys.stdin.isatty():
        return getpass.getpass(prompt)
    print(prompt, flush=True)
    return sys.stdin.readline()


def _has_display() -> bool:
    if os.environ.get("SSH_CONNECTION") or os.environ.get("SSH_TTY"):
        return False
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _error(text: str, code: int = EXIT_FAILED) -> int:
    print(f"error: {text}", file=sys.stderr, flush=True)
    return code


def _account(config: Config, address: str) -> AccountConfig | str:
    account = find_account(config, address)
    if account is None:
        return f"{address} is not a configured account (see `relayd check-config`)"
    if account.oauth is None or account.password is not None:
        return f"{address} logs in with a password; there is nothing to consent to"
    if account.oauth.flow in APP_ONLY_FLOWS:
        return (
            f"{address} is covered by the tenant's app-only credentials "
            f"({account.oauth.flow}): relayd obtains its tokens itself; grant the app access "
            "to the mailbox in the provider's admin console instead"
        )
    return account


def _run_flow(account: AccountConfig, method: str | None) -> flows.ConsentResult | int:
    oauth = account.oauth
    assert oauth is not None
    preset = PRESETS.get(account.provider)
    family = preset.oauth_family if preset is not None else "generic"
    address = account.address
    if oauth.flow == "refresh_token":
        return flows.generic_pasted_token(oauth, address, _ask_hidden)
    if family == "microsoft":
        confidential = oauth.client_secret is not None or oauth.certificate is not None
        if method == "device-code" or (
            method in (None, "no-browser") and not confidential and not _has_display()
        ):
            return flows.microsoft_device_code(oauth, address, _say)
        return flows.microsoft_browser(oauth, address, _say, open_browser=method != "no-browser")
    if family == "google":
        if method == "device-code":
            return _error(
                "Google's device flow does not allow the mail scope; use --browser, or "
                "--no-browser to paste the redirected address back",
                EXIT_USAGE,
            )
        paste = method == "no-browser" or (method is None and not _has_display())
        return flows.google_installed_app(oauth, address, _say, _ask_visible, paste=paste)
    return _error(f"provider {account.provider} has no consent flow; set oauth.refresh_token")


def cmd_auth(args: argparse.Namespace) -> int:
    """Obtain and store OAuth tokens for a delegated account."""
    config = load_for_command(getattr(args, "config", None))
    if config is None:
        return EXIT_USAGE
    found = _account(config, str(args.address))
    if isinstance(found, str):
        return _error(found)
    account = found
    assert account.oauth is not None
    try:
        outcome = _run_flow(account, args.method)
    except KeyboardInterrupt:
        return _error("interrupted; nothing was stored")
    except TokenError as exc:
        return _error(f"{exc}; nothing was stored")
    if isinstance(outcome, int):
        return outcome
    if outcome.signed_in_as and outcome.signed_in_as.lower() != account.address:
        _say(
            f"warning: you signed in as {outcome.signed_in_as}, not {account.address}; the "
            "provider will refuse to send as the account unless that identity may."
        )
    store = TokenStore(config.state_directory, key=config.tokens_key)
    try:
        config.state_directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        save_consent(store, account, outcome)
    except (TokenStoreError, OSError) as exc:
        return _error(f"could not store the tokens: {exc}")
    _say(
        f"\nDone: tokens for {account.address} are stored, encrypted, in "
        f"{store.path_for(account.address)}.\n"
        "A running relayd picks them up within a few seconds; mail held for this account "
        "is then sent. Nothing to restart. Check with `relayd status`."
    )
    return EXIT_OK
