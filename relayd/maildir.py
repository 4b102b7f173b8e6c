"""The ``capture`` provider: delivery into a local Maildir, nothing leaves the machine.

Each delivered message is written to ``<path>/new/`` (one file per message, as delivered,
with an ``X-Relayd-Envelope`` line prepended so a tester can see the envelope) and its Sent
copy — the exact delivered bytes — to ``<path>/.Sent/cur/`` flagged Seen, so the local demo
shows the whole path. Maildir delivery: write in ``tmp/``, then rename (atomic, no reader ever
sees half a message).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

__all__ = ["CaptureMaildir"]

_counter = 0


def _unique_name() -> str:
    global _counter
    _counter += 1
    return f"{time.time_ns()}.P{os.getpid()}Q{_counter}.{socket.gethostname()}"


class CaptureMaildir:
    def __init__(self, path: Path, *, fsync: bool = True) -> None:
        self.path = path
        self.fsync = fsync

    def _ensure(self, folder: Path) -> None:
        for sub in ("tmp", "new", "cur"):
            (folder / sub).mkdir(mode=0o700, parents=True, exist_ok=True)

    def _write(self, folder: Path, target: str, name: str, data: bytes) -> Path:
        self._ensure(folder)
        tmp = folder / "tmp" / name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        final = folder / target / (name + (":2,S" if target == "cur" else ""))
        os.rename(tmp, final)
        return final

    def deliver(self, sender: str, recipients: tuple[str, ...], content: bytes) -> Path:
        envelope = f"X-Relayd-Envelope: from=<{sender}> to=" + ",".join(
            f"<{r}>" for r in recipients
        )
        data = envelope.encode("utf-8", "replace") + b"\r\n" + content
        return self._write(self.path, "new", _unique_name(), data)

    def file_sent_copy(self, content: bytes, name: str | None = None) -> Path:
        """``name`` (unique per message) lets ``has_sent_copy`` tell a copy already filed."""
        return self._write(self.path / ".Sent", "cur", name or _unique_name(), content)

    def has_sent_copy(self, name: str) -> bool:
        return (self.path / ".Sent" / "cur" / (name + ":2,S")).exists()
