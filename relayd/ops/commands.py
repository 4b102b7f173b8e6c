"""The operator's commands: ``status``, ``queue``, ``reload`` and ``sendmail`` (the handlers
``relayd.cli`` registers).

Commands that change what the daemon is doing (flush, hold, release, delete) go through the
control socket while it runs, so its scheduler never finds its files moved behind its back.
With the daemon stopped they work on the spool directly — every change is a rename, which
is safe with nobody else scheduling — and say so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from relayd.config import load_for_command
from relayd.config.model import Config
from relayd.core.health import AccountHealth
from relayd.ops.control import ControlError, DaemonNotRunning, call_daemon
from relayd.ops.spoolview import QueueEntry, entries, find_entry, next_try
from relayd.ops.status import gather, render_table
from relayd.queue import commands
from relayd.queue.commands import CommandError, StoppedQueue
from relayd.spool.accounts import AccountStore, HealthBook
from relayd.spool.sealing import spool_key
from relayd.spool.store import Spool

__all__ = [
    "add_queue_arguments",
    "add_sendmail_arguments",
    "add_status_arguments",
    "cmd_queue",
    "cmd_reload",
    "cmd_sendmail",
    "cmd_status",
]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
QUEUE_ACTIONS = ("list", "show", "flush", "hold", "release", "delete")


def _config(args: argparse.Namespace) -> Config | None:
    return load_for_command(getattr(args, "config", None))


def _ask(config: Config, command: str, arguments: dict[str, Any] | None = None) -> Any:
    """The daemon's answer; DaemonNotRunning when it is down; SystemExit-free."""
    return call_daemon(config.state_directory, command, arguments)


def _permission_hint(config: Config, exc: OSError) -> int:
    print(
        f"error: cannot reach {config.state_directory}: {exc.strerror or exc} "
        "(run as the relayd user or root)",
        file=sys.stderr,
    )
    return EXIT_FAILED


def _adopt(config: Config, path: Path) -> None:
    """Files written by root for a daemon that runs as relayd must stay readable to it."""
    if os.geteuid() != 0:
        return
    try:
        st = config.state_directory.stat()
        if st.st_uid != 0 and path.exists():
            os.chown(path, st.st_uid, st.st_gid)
    except OSError:
        pass


# -- status -----------------------------------------------------------------------------------


def add_status_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON")


def cmd_status(args: argparse.Namespace) -> int:
    """Per account state, queued mail and Sent-copy backlog; works with the daemon stopped."""
    config = _config(args)
    if config is None:
        return EXIT_USAGE
    live: dict[str, Any] | None = None
    try:
        live = _ask(config, "status")
    except DaemonNotRunning:
        live = None
    except ControlError as exc:
        print(f"warning: the daemon did not answer: {exc}", file=sys.stderr)
    except PermissionError as exc:
        return _permission_hint(config, exc)
    try:
        report = gather(config, live)
    except PermissionError as exc:
        return _permission_hint(config, exc)
    if config.fleet is not None:
        from relayd.ops.fleetcmd import fleet_status

        report = dataclasses.replace(report, fleet=fleet_status(config.fleet))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        sys.stdout.write(render_table(report))
    return EXIT_OK


# -- reload -----------------------------------------------------------------------------------


def cmd_reload(args: argparse.Namespace) -> int:
    """Ask the running daemon to re-read its configuration (like SIGHUP)."""
    config = _config(args)
    if config is None:
        return EXIT_USAGE  # the daemon would refuse it too; say so before asking
    try:
        answer = _ask(config, "reload")
    except DaemonNotRunning:
        print("error: relayd is not running", file=sys.stderr)
        return EXIT_FAILED
    except PermissionError as exc:
        return _permission_hint(config, exc)
    except ControlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"relayd reloaded {config.source}")
    for note in (answer or {}).get("restart_needed", []):
        print(f"needs a restart: {note}")
    return EXIT_OK


# -- queue ------------------------------------------------------------------------------------


def add_queue_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=QUEUE_ACTIONS, help="what to do")
    parser.add_argument("queue_id", nargs="?", metavar="ID", help="a queue id")
    parser.add_argument("--account", metavar="A", help="only this account's mail")
    parser.add_argument("--json", action="store_true", help="print JSON")


def _when(epoch: float | None) -> str:
    return "-" if not epoch else datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M:%S")


def _with_next_try(entry: QueueEntry, health: dict[str, AccountHealth]) -> dict[str, Any]:
    data = entry.to_dict()
    nxt = next_try(entry, health.get(entry.envelope.account))
    data["next_try_at"], data["waiting_for"] = nxt.at, nxt.waiting_for
    return data


def _print_list(found: list[QueueEntry], health: dict[str, AccountHealth], as_json: bool) -> None:
    if as_json:
        print(json.dumps([_with_next_try(e, health) for e in found], indent=2))
        return
    for e in found:
        data = _with_next_try(e, health)
        hold = " (held by operator)" if e.state.operator_hold else ""
        print(
            f"{e.queue_id}  {e.queue.value:<8} {e.size:>9}  {_when(e.envelope.received_at)}  "
            f"{e.envelope.sender or '<>'} via {e.envelope.account}{hold}"
        )
        for rcpt in data["recipients"]:
            print(f"    to <{rcpt}>")
        if e.state.last_reply:
            print(f"    ({e.state.last_reply}; attempts {e.state.attempts})")
        print(f"    next: {_when_next(data)}")
    print(f"-- {len(found)} messages")


def _when_next(data: dict[str, Any]) -> str:
    at = data["next_try_at"]
    return data["waiting_for"] if at is None else f"{_when(at)} ({data['waiting_for']})"


def _show(spool: Spool, queue_id: str, health: dict[str, AccountHealth], as_json: bool) -> int:
    entry = find_entry(spool, queue_id)
    if entry is None:
        print(f"error: {queue_id}: no such message", file=sys.stderr)
        return EXIT_FAILED
    content = spool.load(entry.queue_id, entry.queue).read_content()
    data = _with_next_try(entry, health)
    if as_json:
        data["content"] = content.decode("utf-8", "replace")
        print(json.dumps(data, indent=2))
        return EXIT_OK
    for key in (
        "id",
        "queue",
        "account",
        "tenant",
        "client",
        "sender",
        "recipients",
        "delivered",
        "bounced",
        "size",
        "attempts",
        "last_reply",
        "relay",
    ):
        value = data[key]
        print(f"{key}: {', '.join(value) if isinstance(value, list) else value}")
    print(f"received: {_when(entry.envelope.received_at)}")
    print(f"next attempt: {_when_next(data)}")
    print()
    sys.stdout.write(content.decode("utf-8", "replace").replace("\r\n", "\n"))
    return EXIT_OK


def cmd_queue(args: argparse.Namespace) -> int:
    """postqueue/postsuper for relayd."""
    config = _config(args)
    if config is None:
        return EXIT_USAGE
    action, queue_id, account = args.action, args.queue_id, args.account
    needs_id = action in ("show", "hold", "delete") or (action == "release" and not account)
    if needs_id and not queue_id:
        print(f"error: queue {action} needs a queue ID", file=sys.stderr)
        return EXIT_USAGE
    spool = Spool(config.state_directory, fsync=True, key=spool_key(config.spool))
    try:
        if action in ("list", "show"):
            # Account health is on disk, each change written as it happens: readable whether
            # the daemon runs or not.
            health = AccountStore(config.state_directory).load_all()
            if action == "show":
                return _show(spool, queue_id, health, args.json)
            _print_list(entries(spool, account=account), health, args.json)
            return EXIT_OK
        arguments = {k: v for k, v in (("id", queue_id), ("account", account)) if v}
        try:
            result = _ask(config, action, arguments)
        except DaemonNotRunning:
            return _offline(config, spool, action, queue_id, account)
        except ControlError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_FAILED
    except PermissionError as exc:
        return _permission_hint(config, exc)
    print(_describe(action, result))
    return EXIT_OK


def _describe(action: str, result: dict[str, Any]) -> str:
    if action == "flush":
        return f"{result['flushed']} deferred messages are being retried now"
    if action == "release" and "was_paused" in result:
        state = "resumed (was paused)" if result["was_paused"] else "was not paused"
        return f"{result['released']}: {state}; its held mail is being delivered"
    return f"{action}: {next(iter(result.values()))}"


def _offline(
    config: Config, spool: Spool, action: str, queue_id: str | None, account: str | None
) -> int:
    """The same commands on the spool directly: the daemon is not running."""
    note = "relayd is not running: changed the spool directly"
    view = StoppedQueue(spool)
    book = HealthBook(AccountStore(config.state_directory))
    book.store.prepare()
    book.load()
    try:
        if action == "flush":
            moved = commands.flush(view, book, queue_id=queue_id, account=account)
            print(f"{note}; {moved} deferred messages are tried first when it starts")
            return EXIT_OK
        if action == "release" and queue_id is None and account is not None:
            address = account.lower()
            if not any(a.address == address for a in config.accounts()):
                print(f"error: {address}: not a configured account", file=sys.stderr)
                return EXIT_FAILED
            released = commands.release_account(view, book, address)
            print(
                f"{note}; {address} released (was {released.before.state.value}); "
                f"{released.moved} held messages are delivered when it starts"
            )
            return EXIT_OK
        assert queue_id is not None
        if action == "hold":
            commands.hold(view, queue_id)
        elif action == "release":
            commands.release(view, queue_id)
        elif action == "delete":
            commands.delete(view, queue_id)
    except CommandError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        # Files written by root for a daemon that runs as relayd must stay readable to it.
        for path in book.store.root.glob("*.json"):
            _adopt(config, path)
        if queue_id is not None:
            _adopt(config, spool.state_path(queue_id))
    print(f"{note}; {action}: {queue_id}")
    return EXIT_OK


# -- sendmail ---------------------------------------------------------------------------------


def add_sendmail_arguments(parser: argparse.ArgumentParser) -> None:
    # sendmail's options are not argparse's (-fFROM, -oi, -bs): everything after the command
    # word is passed on as it is, to relayd.ops.sendmail's own parser.
    parser.prefix_chars = "+"
    parser.add_argument("sendmail_args", nargs=argparse.REMAINDER)


def cmd_sendmail(args: argparse.Namespace) -> int:
    """sendmail-compatible submission from stdin, as the calling Unix user."""
    from relayd.ops.sendmail import run

    argv = list(args.sendmail_args)
    config = getattr(args, "config", None)
    if isinstance(config, str) and not any(a.startswith("-C") for a in argv):
        argv = ["-C", config, *argv]
    return run(argv, sys.stdin.buffer, sys.stdout.buffer)
