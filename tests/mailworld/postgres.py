"""A real PostgreSQL server for the fleet tests: Debian's build, ``initdb`` in a temporary
directory, run as the postgres user, on a free loopback port, its socket in that directory.

Each test gets a database of its own (``new_database``) and the URL relayd connects with,
as a role with a password (as in production: the URL's password is what must never be
logged). ``stop`` and ``start`` play the database going away and coming back.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["PostgresServer", "postgres_bin_dir"]

ROLE = "relayd"


def postgres_bin_dir() -> Path | None:
    """The newest installed server's bin directory, None if there is none."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/postgres"),
        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0,
    )
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    def __init__(self) -> None:
        bin_dir = postgres_bin_dir()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL is not installed (Debian: apt-get install postgresql)")
        self.bin = bin_dir
        self.base = Path(tempfile.mkdtemp(prefix="relayd-pg-", dir="/var/tmp"))
        self.data = self.base / "data"
        self.sockets = self.base / "run"
        self.log = self.base / "postgres.log"
        self.port = _free_port()
        self.password = "pg-" + secrets.token_urlsafe(16)
        self._user = pwd.getpwnam("postgres")
        self._databases = 0

    def _as_postgres(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["runuser", "-u", "postgres", "--", *argv],
            capture_output=True,
            text=True,
            check=check,
            cwd=self.base,
        )

    def init(self) -> None:
        os.chmod(self.base, 0o755)
        self.sockets.mkdir()
        for path in (self.base, self.sockets):
            os.chown(path, self._user.pw_uid, self._user.pw_gid)
        self._as_postgres(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
            "--no-sync",
        )
        self.start()
        self.psql(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{self.password}'")

    def start(self, timeout: float = 30.0) -> None:
        options = (
            f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=200"
        )
        self._as_postgres(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            options,
            "-w",
            "-t",
            str(int(timeout)),
            "start",
        )

    def stop(self) -> None:
        """Stop at once (``-m fast``: sessions are cut off, as when the server goes away)."""
        self._as_postgres(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop", check=False
        )

    def running(self) -> bool:
        done = self._as_postgres(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "status", check=False
        )
        return done.returncode == 0

    def psql(self, sql: str, database: str = "postgres") -> str:
        done = self._as_postgres(
            str(self.bin / "psql"),
            "-h",
            str(self.sockets),
            "-p",
            str(self.port),
            "-d",
            database,
            "-v",
            "ON_ERROR_STOP=1",
            "-At",
            "-c",
            sql,
        )
        return done.stdout.strip()

    def new_database(self) -> str:
        """A fresh database owned by the relayd role; its URL."""
        self._databases += 1
        name = f"fleet{self._databases}_{secrets.token_hex(3)}"
        self.psql(f"CREATE DATABASE {name} OWNER {ROLE}")
        return self.url(name)

    def url(self, database: str) -> str:
        return f"postgresql://{ROLE}:{self.password}@127.0.0.1:{self.port}/{database}"

    def destroy(self) -> None:
        self.stop()
        deadline = time.monotonic() + 10
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.1)
        shutil.rmtree(self.base, ignore_errors=True)
