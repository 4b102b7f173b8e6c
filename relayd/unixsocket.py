"""Unix socket files of relayd (listeners, control.sock, submit.sock): safe reuse of a path."""

from __future__ import annotations

import socket
import stat
from pathlib import Path

__all__ = ["clear_stale_socket", "unix_socket_in_use"]


def unix_socket_in_use(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def clear_stale_socket(path: Path) -> None:
    """A socket file left by a relayd that died is removed; anything else is an error.

    A live socket means another daemon serves this state directory: binding over it would
    steal its clients, so that is refused too.
    """
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"{path}: exists and is not a socket; not removing it")
    if unix_socket_in_use(path):
        raise OSError(
            f"{path}: another process is listening on it "
            "(is another relayd running on this state directory?)"
        )
    path.unlink()
