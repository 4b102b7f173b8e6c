"""A real mail world on loopback: Postfix (upstream) and Dovecot (IMAP, LMTP, SASL).

Both daemons run from config directories under one base directory, each in its own
process group, on free loopback ports. Nothing can leave the machine: mail for
``example.test`` is delivered over LMTP into Dovecot, everything else bounces.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Self

from .oauth_server import OAuthServer
from .pki import Pki, create_pki
from .postfix_files import INTERNAL_SERVICES, MASTER, make_queue_dirs, write_config

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

DOMAIN = "example.test"
#: Recipients in this domain are refused by Postfix at RCPT time with a 5xx code.
REJECTED_DOMAIN = "elsewhere.test"
#: The Debian ``mail`` user and group that owns all mailboxes.
MAIL_UID = 8
MAIL_GID = 8
HOST = "127.0.0.1"
MESSAGE_SIZE_LIMIT = 60 * 1024 * 1024

POSTFIX_MASTER = MASTER
POSTQUEUE = Path("/usr/sbin/postqueue")
DOVECOT = Path("/usr/sbin/dovecot")
DOVECOT_DH = Path("/usr/share/dovecot/dh.pem")

#: Files that must exist, and the Debian package that provides each.
REQUIRED_FILES: dict[Path, str] = {
    POSTFIX_MASTER: "postfix",
    Path("/usr/lib/postfix/sbin/smtpd"): "postfix",
    DOVECOT: "dovecot-core",
    Path("/usr/lib/dovecot/imap"): "dovecot-imapd",
    Path("/usr/lib/dovecot/lmtp"): "dovecot-lmtpd",
}

_START_TIMEOUT = 10.0
_START_ATTEMPTS = 3
_STOP_TIMEOUT = 5.0
_STOP_GRACE = 1.0
_MAILDIR_NAME_RE = re.compile(r"^(\d+)\.(?:M(\d+))?")
# Unix socket paths are limited to 108 bytes; Dovecot puts sockets up to ~25 bytes
# deep below its base_dir.
_MAX_BASE_DIR_LEN = 75


def missing_packages() -> list[str]:
    """Debian packages whose files the mail world needs but which are not installed."""
    missing: list[str] = []
    for path, package in REQUIRED_FILES.items():
        if not path.exists() and package not in missing:
            missing.append(package)
    return missing


def make_base_dir(prefix: str = "mailworld-") -> Path:
    """Create a fresh mode-0755 directory in /var/tmp, suitable as a MailWorld base."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    os.chmod(path, 0o755)
    return path


def _free_ports(count: int) -> list[int]:
    """Distinct free TCP ports on the loopback address (all held open at once)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _check_traversable(path: Path) -> None:
    """Postfix exits 1 without logging anything if a parent directory is not o+x."""
    for p in [path, *path.parents]:
        mode = p.stat().st_mode
        if not mode & stat.S_IXOTH:
            raise ValueError(
                f"{p} has mode {stat.S_IMODE(mode):04o}: every directory above a "
                "MailWorld must be world-searchable (e.g. 0755), or Postfix exits "
                "silently. pytest's tmp_path is below a 0700 directory; use "
                "tests.mailworld.world.make_base_dir() (a 0755 dir in /var/tmp)."
            )


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(text.splitlines()[-lines:])


def _group_members(pgid: int) -> list[int]:
    """PIDs of live (non-zombie) processes in process group ``pgid``."""
    members: list[int] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        # Format: pid (comm) state ppid pgrp ...; comm may contain spaces/parens.
        fields = data[data.rfind(b")") + 2 :].split()
        if len(fields) >= 3 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            members.append(int(entry))
    return members


_LOOPBACK_HEX = f"{struct.unpack('=I', socket.inet_aton(HOST))[0]:08X}"


def _listening(port: int) -> bool:
    """Whether something listens on HOST:port.

    Reads /proc/net/tcp rather than connecting, so that readiness probes leave no
    "connect from"/"lost connection" lines in the daemons' logs.
    """
    wanted = f"{_LOOPBACK_HEX}:{port:04X}"
    try:
        with open("/proc/net/tcp") as f:
            next(f, None)
            return any(
                fields[1] == wanted and fields[3] == "0A"
                for fields in (line.split() for line in f)
                if len(fields) > 3
            )
    except OSError:
        try:
            with socket.create_connection((HOST, port), timeout=1.0):
                return True
        except OSError:
            return False


def _wait_for_port(port: int, deadline: float, daemon: _Daemon) -> None:
    while not _listening(port):
        daemon.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{daemon.name} did not start listening on {HOST}:{port}\n"
                f"--- {daemon.log_path} (tail) ---\n{_tail(daemon.log_path)}"
            )
        time.sleep(0.01)
    daemon.check_alive()


def _wait_for_path(path: Path, deadline: float, daemon: _Daemon) -> None:
    while not path.exists():
        daemon.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{daemon.name} did not create {path}\n"
                f"--- {daemon.log_path} (tail) ---\n{_tail(daemon.log_path)}"
            )
        time.sleep(0.01)


class _Daemon:
    """A foreground daemon in its own session / process group, logging to a file."""

    def __init__(self, name: str, argv: list[str], log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None

    def start(self) -> None:
        if self.proc is not None:
            raise RuntimeError(f"{self.name} is already running")
        log: IO[bytes]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )

    def check_alive(self) -> None:
        if self.proc is None:
            raise RuntimeError(f"{self.name} is not running")
        rc = self.proc.poll()
        if rc is not None:
            raise RuntimeError(
                f"{self.name} exited with status {rc} during start-up "
                f"({' '.join(self.argv)})\n"
                f"--- {self.log_path} (tail) ---\n{_tail(self.log_path)}"
            )

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        self.proc = None
        pgid = proc.pid  # start_new_session=True: the daemon leads its own group
        # SIGTERM to the whole group: Dovecot's master alone takes ~6 s to shut down
        # its children, while they all exit at once when signalled directly.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
        # The master stays unreaped (a zombie) until the group is gone, so its pid,
        # which is the group id, cannot be reused while we still signal the group.
        deadline = time.monotonic() + _STOP_GRACE
        while not _exited_unreaped(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        deadline = min(deadline, time.monotonic() + 0.1)
        while _group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.01)
        # Whatever is left gets SIGKILL: Postfix's half-spawned children ("master"
        # forks that have not exec'd yet) otherwise linger for a second or two.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        deadline = time.monotonic() + _STOP_TIMEOUT
        while _group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.wait()


def _exited_unreaped(pid: int) -> bool:
    """Whether child ``pid`` has exited, without reaping it."""
    try:
        result = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return result is not None


_LIVE_WORLDS: set[MailWorld] = set()


@atexit.register
def _stop_all_worlds() -> None:
    for world in list(_LIVE_WORLDS):
        with contextlib.suppress(Exception):
            world.stop()


class MailWorld:
    """Postfix + Dovecot on loopback, configured under ``base_dir``.

    Ports (all on 127.0.0.1), chosen at construction and stable across
    :meth:`stop_postfix` / :meth:`start_postfix`:

    - ``smtp_starttls_port``: submission (like 587), STARTTLS and AUTH required.
    - ``smtp_implicit_port``: submissions (like 465), implicit TLS, AUTH required.
    - ``smtp_plain_port``: smtpd offering AUTH but no STARTTLS at all.
    - ``smtp_wronghost_port``: implicit TLS with a certificate for ``wrong.example``.
    - ``imap_port`` (STARTTLS), ``imaps_port`` (implicit TLS), ``lmtp_port``.

    Users log in with their full address (``name@example.test``); a bare ``name``
    works too (``auth_default_realm``).
    """

    domain: str = DOMAIN
    host: str = HOST

    def __init__(
        self,
        base_dir: Path | None = None,
        *,
        dovecot_extra_conf: str = "",
        postfix_main_overrides: Mapping[str, str] | None = None,
    ) -> None:
        """Lay out ``base_dir`` and create the PKI; nothing is started yet.

        ``base_dir`` must be below world-searchable directories (not pytest's
        ``tmp_path``); if omitted, a fresh directory in /var/tmp is created and
        removed again by :meth:`stop`. ``dovecot_extra_conf`` is appended to
        dovecot.conf; ``postfix_main_overrides`` are added to main.cf (last wins).
        """
        self._owns_base_dir = base_dir is None
        self.base_dir = make_base_dir() if base_dir is None else Path(base_dir).resolve()
        try:
            self._setup(dovecot_extra_conf, postfix_main_overrides)
        except BaseException:
            if self._owns_base_dir:
                shutil.rmtree(self.base_dir, ignore_errors=True)
            raise

    def _setup(
        self,
        dovecot_extra_conf: str,
        postfix_main_overrides: Mapping[str, str] | None,
    ) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base_dir, 0o755)
        _check_traversable(self.base_dir)

        self.dovecot_extra_conf = dovecot_extra_conf
        self.postfix_main_overrides: dict[str, str] = dict(postfix_main_overrides or {})

        self._pick_ports()

        b = self.base_dir
        self.postfix_config_dir = b / "postfix"
        self.postfix_queue_dir = b / "postfix-queue"
        self.postfix_data_dir = b / "postfix-data"
        self.postfix_log_path = b / "postfix.log"
        self.dovecot_dir = b / "dovecot"
        self.dovecot_conf = self.dovecot_dir / "dovecot.conf"
        self.dovecot_dict_conf = self.dovecot_dir / "dict-auth.conf.ext"
        self.dovecot_run_dir = b / "dovecot-run"
        self.dovecot_state_dir = b / "dovecot-state"
        self.dovecot_log_path = b / "dovecot.log"
        self.users_dir = b / "users"
        self.mail_dir = b / "mail"
        self.sasl_socket = self.dovecot_run_dir / "auth-postfix"

        if len(str(self.dovecot_run_dir)) > _MAX_BASE_DIR_LEN:
            raise ValueError(
                f"base_dir {b} is too long for Dovecot's unix socket paths; "
                "use a shorter directory (e.g. make_base_dir())"
            )
        for path in (
            self.postfix_config_dir,
            self.dovecot_dir,
            self.users_dir / "passdb",
            self.users_dir / "userdb",
        ):
            path.mkdir(parents=True, exist_ok=True)
            os.chmod(path, 0o755)
        self.mail_dir.mkdir(exist_ok=True)
        os.chmod(self.mail_dir, 0o755)
        os.chown(self.mail_dir, MAIL_UID, MAIL_GID)

        self.pki: Pki = create_pki(b / "pki")
        #: The OAuth token server Dovecot validates XOAUTH2 tokens against (introspection).
        self.oauth = OAuthServer(self.pki)
        self.users: dict[str, str] = {}
        self._user_counter = 0

        self._postfix = _Daemon(
            "postfix",
            [str(POSTFIX_MASTER), "-c", str(self.postfix_config_dir), "-s"],
            self.postfix_log_path,
        )
        self._dovecot = _Daemon(
            "dovecot",
            [str(DOVECOT), "-F", "-c", str(self.dovecot_conf)],
            self.dovecot_log_path,
        )
        self._removed = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Write the configs and start Dovecot and Postfix; return once they listen."""
        missing = missing_packages()
        if missing:
            raise RuntimeError("mail world needs these Debian packages: " + " ".join(missing))
        if os.geteuid() != 0:
            raise RuntimeError("mail world must run as root (the Postfix master needs it)")
        if self._removed:
            raise RuntimeError("this MailWorld's directory was removed by stop(); make a new one")
        if self._postfix.running or self._dovecot.running:
            raise RuntimeError("this MailWorld is already running")
        _LIVE_WORLDS.add(self)
        try:
            for attempt in range(_START_ATTEMPTS):
                try:
                    self._start_daemons()
                    return
                except RuntimeError as exc:
                    self._postfix.stop()
                    self._dovecot.stop()
                    taken = self._ports_in_use()
                    if not taken:
                        raise
                    if attempt + 1 == _START_ATTEMPTS:
                        raise RuntimeError(
                            f"{exc}\nports taken by other processes: {taken}"
                        ) from exc
                    # Someone grabbed a port between picking and binding: re-pick.
                    self._pick_ports()
        except BaseException:
            self.stop()
            raise

    def _start_daemons(self) -> None:
        self.oauth.start()
        self._write_dovecot_config()
        self._write_postfix_config()
        self._dovecot.start()
        self._postfix.start()
        deadline = time.monotonic() + _START_TIMEOUT
        self._wait_dovecot(deadline)
        self._wait_postfix(deadline)

    def _pick_ports(self) -> None:
        (
            self.smtp_starttls_port,
            self.smtp_implicit_port,
            self.smtp_plain_port,
            self.smtp_wronghost_port,
            self.imap_port,
            self.imaps_port,
            self.lmtp_port,
        ) = _free_ports(7)

    def _ports_in_use(self) -> list[int]:
        """This world's ports that cannot be bound (taken by another process)."""
        taken: list[int] = []
        for port in (*self.smtp_ports, self.imap_port, self.imaps_port, self.lmtp_port):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((HOST, port))
                except OSError:
                    taken.append(port)
        return taken

    def stop(self) -> None:
        """Stop both daemons (killing their process groups). Safe to call repeatedly."""
        try:
            self._postfix.stop()
        finally:
            try:
                self._dovecot.stop()
                self.oauth.stop()
            finally:
                _LIVE_WORLDS.discard(self)
                if self._owns_base_dir:
                    self._removed = True
                    shutil.rmtree(self.base_dir, ignore_errors=True)

    def stop_postfix(self) -> None:
        """Stop Postfix only (upstream down): its ports refuse connections."""
        self._postfix.stop()

    def start_postfix(self) -> None:
        """Start Postfix again on the same ports, with the same queue."""
        _LIVE_WORLDS.add(self)
        self._postfix.start()
        try:
            self._wait_postfix(time.monotonic() + _START_TIMEOUT)
        except BaseException:
            self._postfix.stop()
            raise

    def stop_dovecot(self) -> None:
        """Stop Dovecot only (IMAP, LMTP and SASL down)."""
        self._dovecot.stop()

    def start_dovecot(self) -> None:
        """Start Dovecot again on the same ports."""
        _LIVE_WORLDS.add(self)
        self._dovecot.start()
        try:
            self._wait_dovecot(time.monotonic() + _START_TIMEOUT)
        except BaseException:
            self._dovecot.stop()
            raise

    @property
    def postfix_running(self) -> bool:
        return self._postfix.running

    @property
    def dovecot_running(self) -> bool:
        return self._dovecot.running

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait_postfix(self, deadline: float) -> None:
        for port in self.smtp_ports:
            _wait_for_port(port, deadline, self._postfix)

    def _wait_dovecot(self, deadline: float) -> None:
        for port in (self.imap_port, self.imaps_port, self.lmtp_port):
            _wait_for_port(port, deadline, self._dovecot)
        _wait_for_path(self.sasl_socket, deadline, self._dovecot)

    @property
    def smtp_ports(self) -> tuple[int, int, int, int]:
        return (
            self.smtp_starttls_port,
            self.smtp_implicit_port,
            self.smtp_plain_port,
            self.smtp_wronghost_port,
        )

    # ---------------------------------------------------------------------- users

    def address(self, name: str) -> str:
        """``name@example.test`` (lower-cased); a full address is returned as is."""
        name = name.lower()
        return name if "@" in name else f"{name}@{self.domain}"

    def home(self, name: str) -> Path:
        return self.mail_dir / self.address(name)

    def add_user(self, name: str, password: str) -> str:
        """Create a user (effective at once, also mid-run); return its address."""
        address = self.address(name)
        home = self.home(address)
        home.mkdir(mode=0o755, exist_ok=True)
        os.chown(home, MAIL_UID, MAIL_GID)
        self._write_user_file("userdb", address, {"home": str(home)})
        self._write_user_file("passdb", address, {"password": "{PLAIN}" + password})
        self.users[address] = password
        return address

    def new_user(self, prefix: str = "user", password: str | None = None) -> tuple[str, str]:
        """Add a user with a name new to this world; return (address, password)."""
        self._user_counter += 1
        name = f"{prefix}{self._user_counter}"
        while self.address(name) in self.users:
            self._user_counter += 1
            name = f"{prefix}{self._user_counter}"
        password = password if password is not None else f"pw-{name}-{os.urandom(4).hex()}"
        return self.add_user(name, password), password

    def set_password(self, name: str, password: str) -> None:
        """Change a user's password (effective at once)."""
        address = self.address(name)
        if address not in self.users:
            raise KeyError(f"no such user: {address}")
        self._write_user_file("passdb", address, {"password": "{PLAIN}" + password})
        self.users[address] = password

    def _write_user_file(self, kind: str, address: str, data: Mapping[str, str]) -> None:
        if "/" in address or address.startswith("."):
            raise ValueError(f"bad user name: {address!r}")
        directory = self.users_dir / kind
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, directory / address)

    # ------------------------------------------------------------------- mailboxes

    def maildir(self, name: str, folder: str = "INBOX") -> Path:
        """The Maildir++ directory of ``folder`` ("Sent" -> ``~/Maildir/.Sent``)."""
        root = self.home(name) / "Maildir"
        if folder.upper() == "INBOX":
            return root
        return root / ("." + folder.replace("/", "."))

    def messages(self, name: str, folder: str = "INBOX") -> list[bytes]:
        """Raw bytes of every message in the folder (new/ and cur/), oldest first.

        Files are as Dovecot stored them: LF line endings, with the Return-Path,
        Delivered-To and Received headers added on delivery.
        """
        directory = self.maildir(name, folder)
        for _ in range(20):
            try:
                return [p.read_bytes() for p in self._message_files(directory)]
            except FileNotFoundError:
                # A message moved from new/ to cur/ between listing and reading.
                time.sleep(0.01)
        return [p.read_bytes() for p in self._message_files(directory)]

    @staticmethod
    def _message_files(directory: Path) -> list[Path]:
        files: list[tuple[tuple[int, int, str], Path]] = []
        for sub in ("new", "cur"):
            try:
                names = os.listdir(directory / sub)
            except FileNotFoundError:
                continue
            for fname in names:
                if fname.startswith("."):
                    continue
                m = _MAILDIR_NAME_RE.match(fname)
                secs = int(m.group(1)) if m else 0
                usecs = int(m.group(2)) if m and m.group(2) else 0
                base = fname.split(":", 1)[0]
                files.append(((secs, usecs, base), directory / sub / fname))
        files.sort(key=lambda item: item[0])
        return [path for _, path in files]

    def wait_for_messages(
        self, name: str, count: int, folder: str = "INBOX", timeout: float = 20.0
    ) -> list[bytes]:
        """Poll until ``folder`` holds at least ``count`` messages; return them all."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.messages(name, folder)
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"expected at least {count} message(s) in {self.address(name)} "
                    f"folder {folder!r} within {timeout}s, found {len(found)} "
                    f"(in {self.maildir(name, folder)})\n"
                    f"--- postfix log (tail) ---\n{_tail(self.postfix_log_path)}\n"
                    f"--- dovecot log (tail) ---\n{_tail(self.dovecot_log_path, 15)}"
                )
            time.sleep(0.05)

    # ------------------------------------------------------------------------ logs

    def postfix_log(self) -> str:
        return self._read_log(self.postfix_log_path)

    def dovecot_log(self) -> str:
        return self._read_log(self.dovecot_log_path)

    @staticmethod
    def _read_log(path: Path) -> str:
        try:
            return path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def mailq(self) -> str:
        """Output of ``postqueue -p`` for this Postfix instance."""
        return self._postqueue("-p")

    def flush_queue(self) -> None:
        """Ask Postfix to retry deferred mail now (``postqueue -f``)."""
        self._postqueue("-f")

    def _postqueue(self, flag: str) -> str:
        result = subprocess.run(
            [str(POSTQUEUE), "-c", str(self.postfix_config_dir), flag],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        return result.stdout + result.stderr

    # ---------------------------------------------------------------------- config

    def _write_dovecot_config(self) -> None:
        for path in (self.dovecot_run_dir, self.dovecot_state_dir):
            path.mkdir(exist_ok=True)
            os.chmod(path, 0o755)
        self.dovecot_dict_conf.write_text(
            f"uri = fs:posix:prefix={self.users_dir}/\n"
            "default_pass_scheme = PLAIN\n"
            "iterate_prefix = userdb/\n"
            "key passdb {\n  key = passdb/%u\n  format = json\n}\n"
            "key userdb {\n  key = userdb/%u\n  format = json\n}\n"
            "passdb_objects = passdb\n"
            "userdb_objects = userdb\n"
        )
        dh = f"ssl_dh = <{DOVECOT_DH}\n" if DOVECOT_DH.exists() else ""
        mailboxes = "".join(
            f"  mailbox {box} {{\n    special_use = \\{box}\n    auto = subscribe\n  }}\n"
            for box in ("Sent", "Drafts", "Trash", "Junk")
        )
        self.dovecot_conf.write_text(
            f"""\
instance_name = mailworld
protocols = imap lmtp
listen = {HOST}
base_dir = {self.dovecot_run_dir}
state_dir = {self.dovecot_state_dir}
log_path = {self.dovecot_log_path}

ssl = required
ssl_cert = <{self.pki.server_cert}
ssl_key = <{self.pki.server_key}
ssl_client_ca_file = {self.pki.ca_cert}
{dh}
disable_plaintext_auth = no
auth_mechanisms = plain login xoauth2 oauthbearer
auth_default_realm = {DOMAIN}
auth_failure_delay = 0
auth_cache_size = 0
auth_verbose = yes

first_valid_uid = {MAIL_UID}
first_valid_gid = {MAIL_GID}
mail_uid = {MAIL_UID}
mail_gid = {MAIL_GID}
mail_location = maildir:~/Maildir
mail_fsync = never
postmaster_address = postmaster@{DOMAIN}

{self.oauth.dovecot_passdbs(self.dovecot_dir)}passdb {{
  driver = dict
  mechanisms = plain login
  args = {self.dovecot_dict_conf}
}}
userdb {{
  driver = dict
  args = {self.dovecot_dict_conf}
}}

namespace inbox {{
  inbox = yes
{mailboxes}}}

protocol imap {{
  mail_max_userip_connections = 1000
}}

service imap-login {{
  inet_listener imap {{
    address = {HOST}
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    address = {HOST}
    port = {self.imaps_port}
    ssl = yes
  }}
}}
service lmtp {{
  inet_listener lmtp {{
    address = {HOST}
    port = {self.lmtp_port}
  }}
}}
service auth {{
  unix_listener auth-postfix {{
    mode = 0666
  }}
}}
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service stats {{
  unix_listener stats-writer {{
    mode = 0666
  }}
}}
{self.dovecot_extra_conf}
"""
        )

    def _postfix_main(self) -> dict[str, str]:
        return {
            "compatibility_level": "3.6",
            "queue_directory": str(self.postfix_queue_dir),
            "data_directory": str(self.postfix_data_dir),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": "smtp.upstream.test",
            "mydestination": "",
            "inet_interfaces": HOST,
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.1/32",
            "maillog_file": "/dev/stdout",
            "biff": "no",
            "append_dot_mydomain": "no",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "local_transport": "error:no local mail",
            "relay_domains": "",
            "virtual_mailbox_domains": DOMAIN,
            "virtual_transport": f"lmtp:inet:{HOST}:{self.lmtp_port}",
            "default_transport": "error:no outside mail",
            "relay_transport": "error:no outside mail",
            "message_size_limit": str(MESSAGE_SIZE_LIMIT),
            "mailbox_size_limit": "0",
            "virtual_mailbox_limit": "0",
            "line_length_limit": "2048",
            # Postfix's LMTP client folds lines over 998 bytes on the way into Dovecot; the
            # tests check that long lines are relayed as they are, so store them unfolded.
            "lmtp_line_length_limit": "0",
            "smtpd_banner": "$myhostname ESMTP",
            "smtpd_peername_lookup": "no",
            "smtpd_error_sleep_time": "0",
            "smtpd_tls_cert_file": str(self.pki.server_cert),
            "smtpd_tls_key_file": str(self.pki.server_key),
            "smtpd_tls_security_level": "may",
            "smtpd_tls_loglevel": "1",
            "smtpd_sasl_type": "dovecot",
            "smtpd_sasl_path": str(self.sasl_socket),
            "smtpd_sasl_auth_enable": "no",
            "smtpd_sasl_security_options": "noanonymous",
            "smtpd_sasl_tls_security_options": "noanonymous",
            "smtpd_relay_restrictions": "permit_sasl_authenticated, reject",
            "smtpd_recipient_restrictions": (
                f"check_recipient_access inline:{{ {REJECTED_DOMAIN}=REJECT }}, "
                "permit_sasl_authenticated, reject"
            ),
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "5s",
        }

    def _postfix_master_cf(self) -> str:
        def smtpd(port: int, label: str, options: Iterable[str]) -> str:
            opts = "".join(f"  -o {o}\n" for o in [f"syslog_name=postfix/{label}", *options])
            return f"{HOST}:{port} inet n - n - - smtpd\n{opts}"

        encrypted = [
            "smtpd_tls_security_level=encrypt",
            "smtpd_sasl_auth_enable=yes",
            "smtpd_tls_auth_only=yes",
        ]
        services = [
            smtpd(self.smtp_starttls_port, "submission", encrypted),
            smtpd(
                self.smtp_implicit_port,
                "submissions",
                ["smtpd_tls_wrappermode=yes", *encrypted],
            ),
            smtpd(
                self.smtp_plain_port,
                "plain",
                [
                    "smtpd_tls_security_level=none",
                    "smtpd_sasl_auth_enable=yes",
                    "smtpd_tls_auth_only=no",
                ],
            ),
            smtpd(
                self.smtp_wronghost_port,
                "wronghost",
                [
                    "smtpd_tls_wrappermode=yes",
                    *encrypted,
                    f"smtpd_tls_cert_file={self.pki.wrong_host_cert}",
                    f"smtpd_tls_key_file={self.pki.wrong_host_key}",
                ],
            ),
        ]
        return "".join(services) + INTERNAL_SERVICES

    def _write_postfix_config(self) -> None:
        if any(c.isspace() for c in str(self.base_dir)):
            raise ValueError(f"Postfix paths must not contain spaces: {self.base_dir}")
        main = self._postfix_main()
        main.update(self.postfix_main_overrides)
        write_config(self.postfix_config_dir, main, self._postfix_master_cf())
        make_queue_dirs(self.postfix_queue_dir, self.postfix_data_dir)
