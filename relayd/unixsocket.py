"""Unix socket files of relayd (listeners, control.sock, submit.sock): safe reuse of a path;
and who is at the other end."""

from __future__ import annotations

import pwd
import socket
import stat
import struct
from pathlib import Path

from relayd.core.routing import UnixUser

__all__ = ["clear_stale_socket", "peer_user", "unix_socket_in_use", "unix_user"]


def unix_user(uid: int) -> UnixUser:
    try:
        return UnixUser(uid, pwd.getpwuid(uid).pw_name)
    except KeyError:  # no passwd entry: known by its uid alone
        return UnixUser(uid, None)


def peer_user(sock: socket.socket) -> UnixUser | None:
    """The user of the process at the other end of a connected unix socket (SO_PEERCRED)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", raw)
    return unix_user(uid)


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
