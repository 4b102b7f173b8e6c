"""The ``relayd`` command line (SPEC "Commands").

``relayd [-c FILE] COMMAND`` with ``-c`` accepted after the command too. Each command is a
handler taking the parsed arguments and returning the exit code: 0 ok, 1 what was asked
failed, 2 usage or config error.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from relayd.config import ConfigError, find_config_path, load_config
from relayd.oauth.consent import add_auth_arguments, cmd_auth
from relayd.ops.checkup import add_test_arguments, cmd_test
from relayd.ops.commands import (
    add_queue_arguments,
    add_sendmail_arguments,
    add_status_arguments,
    cmd_queue,
    cmd_reload,
    cmd_sendmail,
    cmd_status,
)
from relayd.ops.fleetcmd import add_fleet_arguments, cmd_fleet
from relayd.passwords import hash_password
from relayd.web.command import add_connect_arguments, cmd_connect

__all__ = ["COMMANDS", "Command", "build_parser", "main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

Handler = Callable[[argparse.Namespace], int]


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    del parser


@dataclass(frozen=True)
class Command:
    handler: Handler
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None] = _no_arguments


def _config_path(args: argparse.Namespace) -> str | None:
    value = getattr(args, "config", None)
    return value if isinstance(value, str) else None


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate the config: warnings and errors on stderr, each with its path and line."""
    try:
        config = load_config(find_config_path(_config_path(args)))
    except ConfigError as exc:
        for warning in exc.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(
        f"config OK: {len(config.tenants)} tenants, {len(config.accounts())} accounts, "
        f"{len(config.listeners)} listeners"
    )
    return EXIT_OK


def _read_password() -> str | None:
    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != first:
            print("error: the two passwords differ", file=sys.stderr)
            return None
        return first
    # A pipe: one line, so `printf '%s\n' "$PW" | relayd hash-password` works in scripts.
    return sys.stdin.readline().removesuffix("\n").removesuffix("\r")


def cmd_hash_password(args: argparse.Namespace) -> int:
    """Print a hash for a client's `password_hash`."""
    del args
    password = _read_password()
    if password is None:
        return EXIT_FAILED
    if not password:
        print("error: empty password", file=sys.stderr)
        return EXIT_FAILED
    print(hash_password(password))
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    """The daemon in the foreground, logging to stderr."""
    from relayd.daemon import run_daemon
    from relayd.log import configure_logging

    try:
        path = find_config_path(_config_path(args))
        config = load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(config.log_level)
    return run_daemon(path)


COMMANDS: dict[str, Command] = {
    "run": Command(cmd_run, "run the daemon in the foreground"),
    "check-config": Command(cmd_check_config, "validate the configuration"),
    "hash-password": Command(
        cmd_hash_password, "read a password (prompt, or one line of stdin) and print its hash"
    ),
    "auth": Command(cmd_auth, "obtain and store OAuth tokens for an account", add_auth_arguments),
    "connect": Command(
        cmd_connect,
        "print a single-use link with which the mailbox owner connects the account",
        add_connect_arguments,
    ),
    "reload": Command(cmd_reload, "ask the running daemon to reload its configuration"),
    "status": Command(
        cmd_status,
        "accounts, queued mail, the daemon (works while it is stopped)",
        add_status_arguments,
    ),
    "queue": Command(
        cmd_queue, "list, show, flush, hold, release or delete queued mail", add_queue_arguments
    ),
    "test": Command(
        cmd_test, "test & connect: DNS, TCP, TLS, EHLO, login, IMAP", add_test_arguments
    ),
    "sendmail": Command(
        cmd_sendmail, "sendmail-compatible submission from stdin", add_sendmail_arguments
    ),
    "fleet": Command(
        cmd_fleet, "fleet mode: create or migrate the schema in the database", add_fleet_arguments
    ),
}


def build_parser() -> argparse.ArgumentParser:
    # -c on the main parser and on each command, SUPPRESSed so a -c given in one place is not
    # overwritten by the other's default.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="configuration file (default: $RELAYD_CONFIG, else /etc/relayd/relayd.yaml)",
    )
    parser = argparse.ArgumentParser(
        prog="relayd",
        description="Local SMTP relay through each sender's own mailbox provider.",
        parents=[common],
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub = subparsers.add_parser(name, help=command.help, parents=[common])
        command.add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 after --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return COMMANDS[args.command].handler(args)
