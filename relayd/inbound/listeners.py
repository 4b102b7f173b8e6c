"""relayd's SMTP listeners on the running event loop: TCP, STARTTLS, implicit TLS, unix.

Each ``listen:`` entry becomes one asyncio server whose protocol is ``RelaySMTP`` (aiosmtpd's
``Controller`` would run its own loop in a thread; relayd serves on the daemon's loop). All
servers share one ``InboundHandler``, so a reload that replaces ``handler.config`` applies to
every listener at the next transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import stat
import weakref
from dataclasses import dataclass
from pathlib import Path

from relayd.config.model import Config, ListenerConfig, TlsMode
from relayd.inbound.handler import InboundHandler
from relayd.inbound.server import RelaySMTP

__all__ = ["Listeners", "server_tls_context", "start_listeners", "stop_listeners"]

_TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def server_tls_context(listener: ListenerConfig) -> ssl.SSLContext:
    """A server context for the listener's certificate; raises OSError or ssl.SSLError."""
    if listener.certificate is None or listener.private_key is None:
        raise ValueError(f"{listener.where}: TLS needs certificate and private_key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _TLS_VERSIONS.get(listener.tls_min_version, ssl.TLSVersion.TLSv1_2)
    context.load_cert_chain(listener.certificate, listener.private_key)
    return context


@dataclass
class _Listener:
    config: ListenerConfig
    server: asyncio.Server | None = None
    context: ssl.SSLContext | None = None  # STARTTLS: read per connection, swapped on reload


def _unix_socket_in_use(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def _clear_stale_socket(path: Path) -> None:
    """A socket file left by a relayd that died is removed; anything else is an error."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"{path}: exists and is not a socket; not removing it")
    if _unix_socket_in_use(path):
        raise OSError(f"{path}: another process is listening on it")
    path.unlink()


class Listeners:
    """The running listeners of one process."""

    def __init__(self, handler: InboundHandler) -> None:
        self.handler = handler
        self._listeners: list[_Listener] = []
        self._connections: weakref.WeakSet[RelaySMTP] = weakref.WeakSet()

    @property
    def servers(self) -> list[asyncio.Server]:
        return [entry.server for entry in self._listeners if entry.server is not None]

    def addresses(self) -> list[str]:
        """Where the servers listen, resolved (port 0 becomes the port the kernel chose)."""
        found: list[str] = []
        for server in self.servers:
            for sock in server.sockets:
                name = sock.getsockname()
                if isinstance(name, tuple):
                    host = f"[{name[0]}]" if ":" in name[0] else name[0]
                    found.append(f"{host}:{name[1]}")
                else:
                    found.append(f"unix:{name}")
        return found

    async def _start(self, listener: ListenerConfig) -> None:
        loop = asyncio.get_running_loop()
        entry = _Listener(listener)
        implicit: ssl.SSLContext | None = None
        if listener.tls is TlsMode.STARTTLS:
            entry.context = server_tls_context(listener)
        elif listener.tls is TlsMode.IMPLICIT:
            implicit = entry.context = server_tls_context(listener)
        handler, connections = self.handler, self._connections

        def protocol() -> RelaySMTP:
            starttls = entry.context if listener.tls is TlsMode.STARTTLS else None
            smtp = RelaySMTP(
                handler,
                entry.config,  # replaced by reload()
                hostname=handler.config.helo_name,
                starttls_context=starttls,
                loop=loop,
            )
            connections.add(smtp)
            return smtp

        if listener.unix_path is not None:
            _clear_stale_socket(listener.unix_path)
            entry.server = await loop.create_unix_server(protocol, path=str(listener.unix_path))
            # Anyone may connect: the identity is the peer's uid (SO_PEERCRED), not the mode.
            os.chmod(listener.unix_path, 0o666)
        else:
            assert listener.tcp_port is not None
            entry.server = await loop.create_server(
                protocol,
                host=listener.tcp_host,
                port=listener.tcp_port,
                ssl=implicit,
                reuse_address=True,
                ssl_handshake_timeout=30.0 if implicit is not None else None,
            )
        self._listeners.append(entry)

    def reload(self, config: Config) -> list[str]:
        """Apply a reloaded config (SIGHUP) to the running listeners: certificates are
        re-read and ``auth:`` takes effect for new connections.

        Every certificate is loaded before any is used: a broken one raises (OSError,
        ssl.SSLError, ValueError) and the old settings keep serving. What only a restart can
        change (listeners added or removed, TLS turned on or off) is returned as notes.
        """
        by_address = {listener.display: listener for listener in config.listeners}
        notes = [
            f"{listener.display}: new listener, opened at the next start"
            for listener in config.listeners
            if listener.display not in {e.config.display for e in self._listeners}
        ]
        updates: list[tuple[_Listener, ListenerConfig, ssl.SSLContext | None]] = []
        for entry in self._listeners:
            new = by_address.get(entry.config.display)
            if new is None:
                notes.append(f"{entry.config.display}: removed, closed at the next start")
            elif new.tls is not entry.config.tls:
                notes.append(f"{new.display}: tls changed, takes effect at the next start")
            else:
                context = server_tls_context(new) if new.tls is not TlsMode.NONE else None
                updates.append((entry, new, context))
        for entry, new, context in updates:
            if new.tls is TlsMode.STARTTLS:
                entry.context = context  # new connections get it; running ones keep theirs
            elif context is not None and entry.context is not None:
                # The implicit-TLS server holds its context: load the (verified) files into it.
                assert new.certificate is not None and new.private_key is not None
                entry.context.minimum_version = context.minimum_version
                entry.context.load_cert_chain(new.certificate, new.private_key)
            entry.config = new
        return notes

    async def close(self, grace: float = 30.0) -> None:
        """Stop accepting, let messages in DATA finish (up to ``grace`` seconds), then end
        every session with ``421 4.3.2`` (RFC 5321 §3.8) and remove the unix sockets."""
        for server in self.servers:
            server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while any(c.in_data for c in self._connections) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for connection in list(self._connections):
            connection.shutdown()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), timeout=5.0)
        for entry in self._listeners:
            if entry.config.unix_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    entry.config.unix_path.unlink()
        self._listeners.clear()


async def start_listeners(config: Config, handler: InboundHandler) -> Listeners:
    """Open one server per ``listen:`` entry. If any cannot be opened (address in use, bad
    certificate), those already open are closed and the error is raised."""
    listeners = Listeners(handler)
    try:
        for listener in config.listeners:
            await listeners._start(listener)
    except BaseException:
        await listeners.close(grace=0)
        raise
    return listeners


async def stop_listeners(listeners: Listeners, timeout: float = 30.0) -> None:
    """SIGTERM: ``listeners.close(grace=timeout)``."""
    await listeners.close(grace=timeout)
