"""``relayd auth ADDRESS [--device-code|--browser|--no-browser]``: consent once, store, say
what happens next; ``relayd auth ADDRESS --revoke``: take the consent back.

The result goes into the encrypted token store with a new consent id, once the provider's
ID token shows that the account itself signed in (``relayd.oauth.identity``): tokens of
another mailbox are never stored for it. A running daemon sees the store change within
seconds (it polls the token directory), which changes the account's credentials
fingerprint: a paused account resumes and its held mail goes out by itself. ``--revoke``
deletes the stored tokens (and revokes them where the provider can, RFC 7009); the daemon
then holds the account's mail until a new consent.
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
from relayd.oauth.identity import own_identity
from relayd.oauth.passwords import PasswordStore
from relayd.oauth.revocation import revocation_url, revoke_refresh_token
from relayd.oauth.sealed import SealedFilesError
from relayd.oauth.store import StoredTokens, TokenStore, TokenStoreError, new_consent_id
from relayd.oauth.tokens import TokenError

__all__ = ["add_auth_arguments", "cmd_auth", "identity_refusal", "save_consent"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_auth_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("address", metavar="ADDRESS", help="the mailbox to consent for")
    how = parser.add_mutually_exclusive_group()
    how.add_argument(
        "--revoke",
        dest="method",
        action="store_const",
        const="revoke",
        help="delete the stored tokens (revoked at the provider where it can): the "
        "account's mail is then held until a new consent",
    )
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
        scopes=list(account.oauth.scopes),
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


def identity_refusal(account: AccountConfig, outcome: flows.ConsentResult) -> str | None:
    """Why the consent may not be stored for ``account``, or None.

    Microsoft and Google name who signed in in the ID token of their answer; tokens of
    another mailbox would send as that one, or be refused with a 535 nobody can explain.
    A refresh token pasted for a generic provider comes without one: the refresh that
    proved it works is all there is to check."""
    assert account.oauth is not None
    preset = PRESETS.get(account.provider)
    family = preset.oauth_family if preset is not None else "generic"
    if account.oauth.flow == "refresh_token" or family == "generic":
        return None
    if not outcome.identities:
        return "the provider's answer does not say who signed in (no ID token)"
    who = outcome.identities[0]
    if not outcome.verified:
        return f"the provider says {who} is not a verified address"
    if own_identity(outcome.identities, account) is None:
        return (
            f"you signed in as {who}, not {account.address}: sign in as {account.address} "
            "(in a private browser window if the browser remembers another mailbox)"
        )
    return None


def _revoke(config: Config, address: str) -> int:
    """Delete the consent: the stored tokens (or the app password given on the connect
    page), revoked at the provider first where it has an endpoint for that."""
    account = find_account(config, address)
    if account is None:
        return _error(f"{address} is not a configured account (see `relayd check-config`)")
    address = account.address
    if account.connect_password:
        passwords = PasswordStore(config.state_directory, key=config.tokens_key)
        try:
            removed = passwords.remove(address)
        except SealedFilesError as exc:
            return _error(f"could not delete the app password: {exc}")
        if not removed:
            _say(f"No app password is stored for {address}; nothing to delete.")
            return EXIT_OK
        _say(
            f"Deleted the app password given for {address} on the connect page. Revoke it "
            "in the mailbox's security settings too. Its mail is held until a new one is "
            f"given (`relayd connect {address}`)."
        )
        return EXIT_OK
    found = _account(config, address)
    if isinstance(found, str):
        return _error(found)
    oauth = found.oauth
    assert oauth is not None
    if oauth.refresh_token is not None:
        return _error(
            f"the refresh token of {address} is written in the config ({found.where}): "
            "remove it there, then `relayd reload`"
        )
    store = TokenStore(config.state_directory, key=config.tokens_key)
    try:
        existed, record = store.remove(address)
    except (TokenStoreError, OSError) as exc:
        return _error(f"could not delete the tokens: {exc}")
    if config.fleet is not None:
        from relayd.fleet.tokens import withdraw_consent

        problem = withdraw_consent(config.fleet, address)
        if problem is None:
            _say(f"Deleted the tokens of {address} from the fleet database: no host uses them.")
        else:
            _say(f"Could not delete them from the fleet database ({problem}): run this again.")
    if not existed:
        _say(f"No tokens are stored for {address} on this host; nothing to revoke here.")
        return EXIT_OK
    _say(f"Deleted the stored tokens of {address} ({store.path_for(address)}).")
    url = revocation_url(found.provider, oauth)
    code = EXIT_OK
    if record is None or not record.refresh_token:
        _say("The token file held no readable refresh token: nothing to revoke at the provider.")
    elif url is None:
        _say(
            f"{found.provider} has no endpoint to revoke one refresh token: to end every "
            "session of the mailbox, an admin revokes its sign-in sessions (Microsoft "
            "Entra: Revoke sessions, or Graph revokeSignInSessions)."
        )
    else:
        failed = revoke_refresh_token(oauth, url, record.refresh_token)
        if failed is None:
            _say(f"Revoked at the provider ({url}).")
        else:
            code = EXIT_FAILED
            _say(
                f"Could not revoke it at the provider ({failed}); the local copy is gone, "
                "but remove relayd's access in the account's security settings too."
            )
    _say(
        f"{address} now needs consent again (`relayd auth {address}`). A running relayd "
        "notices within seconds, closes the sessions it logged in with them and holds the "
        "account's mail until then. Check with `relayd status`."
    )
    return code


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
    if args.method == "revoke":
        return _revoke(config, str(args.address))
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
    refused = identity_refusal(account, outcome)
    if refused is not None:
        return _error(f"{refused}; nothing was stored")
    store = TokenStore(config.state_directory, key=config.tokens_key)
    try:
        config.state_directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        record = save_consent(store, account, outcome)
    except (TokenStoreError, OSError) as exc:
        return _error(f"could not store the tokens: {exc}")
    if config.fleet is not None:
        from relayd.fleet.tokens import publish_consent

        problem = publish_consent(
            config.fleet,
            account.address,
            store.seal_record(record),
            record.consent_id,
            record.updated_at,
        )
        if problem is None:
            _say("Stored in the fleet database too: every host of the fleet sends with them.")
        else:
            _say(
                f"Could not reach the fleet database ({problem}); this host's relayd shares "
                "them once it can."
            )
    _say(
        f"\nDone: tokens for {account.address} are stored, encrypted, in "
        f"{store.path_for(account.address)}.\n"
        "A running relayd picks them up within a few seconds; mail held for this account "
        "is then sent. Nothing to restart. Check with `relayd status`."
    )
    return EXIT_OK
