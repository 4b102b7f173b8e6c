"""The control socket: ``<state>/control.sock``, one JSON line in, one JSON line out.

Only the relayd user and root may use it (SPEC "Files and directories"): the socket is
created 0600 under a umask (no window where it is wider), and every connection's peer uid is
checked again with SO_PEERCRED, so a socket file made reachable by mistake still answers no
one else. Requests are ``{"command": NAME, "args": {...}}``; replies are ``{"ok": true,
"result": ...}`` or ``{"ok": false, "error": TEXT}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from relayd.unixsocket import clear_stale_socket

__all__ = [
    "ControlError",
    "ControlServer",
    "DaemonNotRunning",
    "call_daemon",
    "control_socket_path",
]

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
_MAX_LINE = 1 << 20


class ControlError(Exception):
    """The daemon answered, and refused or failed the request."""


class DaemonNotRunning(Exception):
    """Nobody listens on the control socket."""


def control_socket_path(state_directory: Path) -> Path:
    return state_directory / "control.sock"


def peer_uid(sock: socket.socket) -> int | None:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    return int(struct.unpack("3i", raw)[1])


class ControlServer:
    def __init__(self, path: Path, handlers: dict[str, Handler]) -> None:
        self.path = path
        self.handlers = handlers
        self._server: asyncio.Server | None = None
        self._allowed = {0, os.getuid()}

    async def start(self) -> None:
        clear_stale_socket(self.path)
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(self.path), limit=_MAX_LINE
            )
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), timeout=5)
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        uid = peer_uid(sock) if sock is not None else None
        try:
            if uid not in self._allowed:
                log.warning("control socket: refused a client with uid %s", uid)
                await self._reply(writer, {"ok": False, "error": "permission denied"})
                return
            line = await asyncio.wait_for(reader.readline(), timeout=30)
            await self._reply(writer, await self._dispatch(line))
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
            pass
        except ValueError:  # a line over the limit
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
            command = request["command"]
            args = request.get("args") or {}
            if not isinstance(command, str) or not isinstance(args, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return {"ok": False, "error": "malformed request"}
        handler = self.handlers.get(command)
        if handler is None:
            return {"ok": False, "error": f"unknown command {command!r}"}
        try:
            return {"ok": True, "result": await handler(args)}
        except ControlError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception:
            log.exception("control command %s failed", command)
            return {"ok": False, "error": "internal error; see the daemon's log"}

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, reply: dict[str, Any]) -> None:
        writer.write(json.dumps(reply).encode() + b"\n")
        await writer.drain()


def call_daemon(
    state_directory: Path, command: str, args: dict[str, Any] | None = None, timeout: float = 60
) -> Any:
    """One request to the running daemon; its result, or ControlError / DaemonNotRunning.

    PermissionError (not the relayd user or root) is left to the caller to explain.
    """
    path = control_socket_path(state_directory)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise DaemonNotRunning(str(path)) from exc
        sock.sendall(json.dumps({"command": command, "args": args or {}}).encode() + b"\n")
        with sock.makefile("rb") as stream:
            line = stream.readline(_MAX_LINE)
    if not line:
        raise ControlError("the daemon closed the connection without answering")
    reply = json.loads(line)
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error", "request failed")))
    return reply.get("result")
