"""``relayd sendmail`` / ``relayd-sendmail``: the sendmail interface PHP ``mail()``, cron,
Symfony and Nagios expect (SPEC "Commands"), with sendmail's exit codes (sysexits.h).

The message goes to the running daemon over ``<state>/submit.sock`` — SMTP on a unix socket,
where the daemon learns the caller's uid from the kernel (SO_PEERCRED) — or, when the daemon
is down, into ``<state>/maildrop/`` (``relayd.inbound.maildrop``). This program reads no secret
and needs no read access to the config: only its ``state_directory``.
"""

from __future__ import annotations

import os
import pwd
import selectors
import smtplib
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.utils import getaddresses
from pathlib import Path
from typing import BinaryIO

import yaml

from relayd.config.loader import DEFAULT_CONFIG_PATH, DEFAULT_STATE_DIRECTORY
from relayd.inbound.maildrop import Drop, maildrop_path, write_drop

__all__ = ["SendmailArgs", "UsageError", "main", "parse_args", "prepare_message", "run"]

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOUSER = 67
EX_SOFTWARE = 70
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78

# Flags sendmail programs accept that change nothing here (SPEC: -odi, -oem, -bm; cron
# passes -B8BITMIME, mutt -oem -oi, some scripts -v).
_IGNORED = {"-bm", "-odi", "-odb", "-oem", "-oee", "-v", "-U"}
_IGNORED_WITH_VALUE = {"-B", "-N", "-R", "-V", "-O"}


# -bs: how long replies are still awaited after the caller's input ended without QUIT.
_DRAIN_SECONDS = 30.0


class UsageError(Exception):
    pass


@dataclass
class SendmailArgs:
    config: str | None = None
    extract: bool = False  # -t
    ignore_dots: bool = False  # -i / -oi
    sender: str | None = None  # -f / -r
    full_name: str | None = None  # -F
    smtp_mode: bool = False  # -bs
    recipients: list[str] = field(default_factory=list)


def parse_args(argv: Sequence[str]) -> SendmailArgs:
    """sendmail's getopt, by hand: ``-fFROM`` and ``-f FROM`` alike, options and recipients
    in any order (as GNU getopt permutes them), ``--`` ends the options."""
    args = SendmailArgs()
    items = list(argv)
    i = 0

    def value(flag: str, arg: str) -> str:
        nonlocal i
        if len(arg) > len(flag):
            return arg[len(flag) :]
        i += 1
        if i >= len(items):
            raise UsageError(f"option {flag} needs a value")
        return items[i]

    while i < len(items):
        arg = items[i]
        if arg == "--":
            args.recipients += items[i + 1 :]
            break
        if not arg.startswith("-") or arg == "-":
            args.recipients.append(arg)
        elif arg in ("-t",):
            args.extract = True
        elif arg in ("-i", "-oi"):
            args.ignore_dots = True
        elif arg == "-bs":
            args.smtp_mode = True
        elif arg in _IGNORED:
            pass
        elif arg[:2] in ("-f", "-r"):
            args.sender = value(arg[:2], arg)
        elif arg.startswith("-F"):
            args.full_name = value("-F", arg)
        elif arg.startswith("-C"):
            args.config = value("-C", arg)
        elif arg[:2] in _IGNORED_WITH_VALUE:
            value(arg[:2], arg)
        elif arg.startswith("-o") and len(arg) > 2:
            pass  # other sendmail.cf options: meaningless here
        elif arg.startswith("-b"):
            raise UsageError(f"mode {arg} is not supported (only -bm and -bs)")
        else:
            raise UsageError(f"unknown option {arg}")
        i += 1
    return args


# -- the message ----------------------------------------------------------------------------


def read_message(stream: BinaryIO, ignore_dots: bool) -> bytes:
    """Without -i, a line holding only "." ends the message (sendmail's default)."""
    if ignore_dots:
        return stream.read()
    lines: list[bytes] = []
    for line in stream:
        if line in (b".\n", b".\r\n", b"."):
            break
        lines.append(line)
    return b"".join(lines)


def _split_head(content: bytes) -> tuple[list[bytes], bytes]:
    """Header lines (with their line ends) and the rest (from the blank line on)."""
    lines = content.splitlines(keepends=True)
    for n, line in enumerate(lines):
        if line in (b"\n", b"\r\n"):
            return lines[:n], b"".join(lines[n:])
        if not line[:1].isspace() and b":" not in line:
            return lines[:n], b"".join(lines[n:])
    return lines, b""


def _fields(head: list[bytes]) -> list[tuple[str, str, list[bytes]]]:
    """(lower-cased name, unfolded value, raw lines) per header field."""
    found: list[tuple[str, str, list[bytes]]] = []
    for line in head:
        if line[:1] in (b" ", b"\t") and found:
            found[-1][2].append(line)
            continue
        name = line.split(b":", 1)[0].strip().decode("ascii", "replace").lower()
        found.append((name, "", [line]))
    result = []
    for name, _, raw in found:
        text = b"".join(raw).decode("utf-8", "replace")
        unfolded = " ".join(text.split(":", 1)[1].split()) if ":" in text else ""
        result.append((name, unfolded, raw))
    return result


def prepare_message(content: bytes, args: SendmailArgs, sender: str) -> tuple[bytes, list[str]]:
    """Apply -t (recipients from To/Cc/Bcc, Bcc removed) and -F; the content is relayed as
    given otherwise (never re-serialised through the email package)."""
    head, rest = _split_head(content)
    fields = _fields(head)
    recipients = list(args.recipients)
    if args.extract:
        values = [v for n, v, _ in fields if n in ("to", "cc", "bcc")]
        recipients += [addr for _, addr in getaddresses(values) if addr]
        fields = [f for f in fields if f[0] != "bcc"]
    if args.full_name and not any(n == "from" for n, _, _ in fields):
        name = args.full_name.replace("\\", "\\\\").replace('"', '\\"')
        name = " ".join(name.split())
        fields.insert(0, ("from", "", [f'From: "{name}" <{sender}>\n'.encode()]))
    new_head = b"".join(line for _, _, raw in fields for line in raw)
    unique: list[str] = []
    for rcpt in recipients:
        if rcpt.lower() not in (u.lower() for u in unique):
            unique.append(rcpt)
    return new_head + rest, unique


# -- where the state directory is -----------------------------------------------------------


def state_directory(config_path: str | None) -> Path:
    """Only ``state_directory`` is read from the config, with plain YAML: the caller (say
    www-data) may not read the secrets the full loader would open."""
    candidates = [config_path, os.environ.get("RELAYD_CONFIG")]
    path = next((Path(c) for c in candidates if c), None)
    if path is None and os.access(DEFAULT_CONFIG_PATH, os.R_OK):
        path = DEFAULT_CONFIG_PATH
    if path is not None:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise OSError(f"{path}: cannot read the configuration: {exc}") from exc
        value = data.get("state_directory") if isinstance(data, dict) else None
        if isinstance(value, str) and value.strip():
            return (path.absolute().parent / value.strip()).absolute()
    from_systemd = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    return Path(from_systemd) if from_systemd else DEFAULT_STATE_DIRECTORY


# -- handing the message over ---------------------------------------------------------------


class _UnixSMTP(smtplib.SMTP):
    def __init__(self, path: Path, timeout: float = 120.0) -> None:
        self._path = str(path)
        super().__init__(timeout=timeout)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        return sock


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _exit_for(code: int, phase: str) -> int:
    if 400 <= code < 500:
        return EX_TEMPFAIL
    if phase == "sender":
        return EX_NOPERM
    if phase == "recipient":
        return EX_NOUSER
    return EX_DATAERR


def _connect(path: Path) -> _UnixSMTP | None:
    """A session with the daemon, or None when it is not running."""
    smtp = _UnixSMTP(path)
    try:
        smtp.connect("localhost", 0)
    except (FileNotFoundError, ConnectionRefusedError):
        return None
    smtp.ehlo("sendmail")
    return smtp


def _send_smtp(smtp: _UnixSMTP, sender: str, rcpts: list[str], content: bytes) -> int:
    options = [] if content.isascii() else ["BODY=8BITMIME"]
    if not all(a.isascii() for a in (sender, *rcpts)):
        options.append("SMTPUTF8")
    try:
        with smtp:
            smtp.sendmail(sender, rcpts, content, mail_options=options)
    except smtplib.SMTPSenderRefused as exc:
        print(f"sendmail: sender refused: {exc.smtp_code} {_text(exc.smtp_error)}", file=sys.stderr)
        return _exit_for(exc.smtp_code, "sender")
    except smtplib.SMTPRecipientsRefused as exc:
        for rcpt, (code, text) in exc.recipients.items():
            print(f"sendmail: <{rcpt}> refused: {code} {_text(text)}", file=sys.stderr)
        codes = [code for code, _ in exc.recipients.values()]
        return _exit_for(min(codes), "recipient")
    except smtplib.SMTPDataError as exc:
        print(
            f"sendmail: message refused: {exc.smtp_code} {_text(exc.smtp_error)}", file=sys.stderr
        )
        return _exit_for(exc.smtp_code, "data")
    except (smtplib.SMTPException, OSError) as exc:
        print(f"sendmail: submission failed: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    return EX_OK


def _drop(state: Path, sender: str, rcpts: list[str], content: bytes) -> int:
    try:
        write_drop(maildrop_path(state), Drop(sender, tuple(rcpts), content))
    except OSError as exc:
        print(
            f"sendmail: relayd is not running and {maildrop_path(state)} cannot take the "
            f"message: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return EX_TEMPFAIL
    return EX_OK


def _proxy(sock: socket.socket, stdin: BinaryIO, stdout: BinaryIO) -> None:
    """-bs with the daemon up: the caller speaks SMTP with the daemon itself."""
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    selector.register(stdin.fileno(), selectors.EVENT_READ)
    # After the caller's input ends, its last commands still get their replies; the socket
    # is not half-closed, as an SMTP server may take EOF as the client going away mid-DATA.
    idle_limit: float | None = None
    while True:
        ready = selector.select(timeout=idle_limit)
        if not ready:
            return
        for key, _ in ready:
            if key.fileobj is sock:
                data = sock.recv(65536)
                if not data:
                    return
                stdout.write(data)
                stdout.flush()
            else:
                data = os.read(stdin.fileno(), 65536)
                if not data:
                    selector.unregister(stdin.fileno())
                    idle_limit = _DRAIN_SECONDS
                else:
                    sock.sendall(data)


def _local_smtp(state: Path, stdin: BinaryIO, stdout: BinaryIO) -> int:
    """-bs with the daemon down: a minimal SMTP server whose messages go to the maildrop."""

    def say(line: str) -> None:
        stdout.write(line.encode() + b"\r\n")
        stdout.flush()

    say("220 relayd sendmail ESMTP (daemon not running: mail is kept in the maildrop)")
    sender: str | None = None
    rcpts: list[str] = []
    for raw in stdin:
        line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
        verb = line[:4].upper()
        if verb in ("EHLO", "HELO"):
            say("250-relayd\r\n250-8BITMIME\r\n250 SMTPUTF8" if verb == "EHLO" else "250 relayd")
        elif verb == "MAIL" and line[4:10].upper() == " FROM:":
            sender, rcpts = _path_of(line[10:]), []
            say("250 2.1.0 Ok")
        elif verb == "RCPT" and line[4:8].upper() == " TO:" and sender is not None:
            rcpts.append(_path_of(line[8:]))
            say("250 2.1.5 Ok")
        elif verb == "DATA" and rcpts and sender is not None:
            say("354 End data with <CR><LF>.<CR><LF>")
            body: list[bytes] = []
            for data_line in stdin:
                if data_line.rstrip(b"\r\n") == b".":
                    break
                body.append(data_line[1:] if data_line.startswith(b".") else data_line)
            status = _drop(state, sender, rcpts, b"".join(body))
            say(
                "250 2.0.0 Ok: queued in maildrop"
                if status == EX_OK
                else "451 4.3.0 Cannot write to the maildrop"
            )
            sender, rcpts = None, []
        elif verb == "RSET":
            sender, rcpts = None, []
            say("250 2.0.0 Ok")
        elif verb == "NOOP":
            say("250 2.0.0 Ok")
        elif verb == "QUIT":
            say("221 2.0.0 Bye")
            return EX_OK
        else:
            say("503 5.5.1 Bad sequence of commands or unknown command")
    return EX_OK


def _path_of(text: str) -> str:
    text = text.strip()
    if text.startswith("<"):
        return text[1 : text.find(">")] if ">" in text else text[1:]
    return text.split(" ", 1)[0]


def run(argv: Sequence[str], stdin: BinaryIO, stdout: BinaryIO) -> int:
    try:
        args = parse_args(argv)
    except UsageError as exc:
        print(f"sendmail: {exc}", file=sys.stderr)
        return EX_USAGE
    try:
        state = state_directory(args.config)
    except OSError as exc:
        print(f"sendmail: {exc}", file=sys.stderr)
        return EX_CONFIG
    submit = state / "submit.sock"
    if args.smtp_mode:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            try:
                sock.connect(str(submit))
            except (FileNotFoundError, ConnectionRefusedError):
                return _local_smtp(state, stdin, stdout)
            except OSError as exc:
                print(f"sendmail: cannot reach {submit}: {exc.strerror}", file=sys.stderr)
                return EX_TEMPFAIL
            _proxy(sock, stdin, stdout)
        return EX_OK
    sender = args.sender or pwd.getpwuid(os.getuid()).pw_name
    content, rcpts = prepare_message(read_message(stdin, args.ignore_dots), args, sender)
    if not rcpts:
        print("sendmail: no recipients (give them as arguments, or use -t)", file=sys.stderr)
        return EX_USAGE
    try:
        smtp = _connect(submit)
    except (smtplib.SMTPException, OSError) as exc:
        print(f"sendmail: cannot talk to relayd on {submit}: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    if smtp is None:
        return _drop(state, sender, rcpts, content)
    return _send_smtp(smtp, sender, rcpts, content)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``relayd-sendmail`` console script."""
    return run(sys.argv[1:] if argv is None else argv, sys.stdin.buffer, sys.stdout.buffer)
