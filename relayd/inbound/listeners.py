"""relayd's SMTP listeners on the running event loop: TCP, STARTTLS, implicit TLS, unix.

Each ``listen:`` entry becomes asyncio servers whose protocol is ``RelaySMTP`` (aiosmtpd's
``Controller`` would run its own loop in a thread; relayd serves on the process's loop). All
servers of a process share one ``InboundHandler``, so a reload that replaces
``handler.config`` applies to every listener at the next transaction.

Binding is separate from serving (``bind_listeners``): the main process binds every socket
before it forks its accepting processes, which all serve the same listening sockets (the
kernel hands each new connection to one of them), and keeps them while they come and go.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from relayd.config.model import Config, ListenerConfig, TlsMode
from relayd.inbound.handler import InboundHandler
from relayd.inbound.server import RelaySMTP
from relayd.unixsocket import clear_stale_socket

__all__ = [
    "BoundListener",
    "Listeners",
    "bind_listeners",
    "close_bound",
    "server_tls_context",
    "start_listeners",
    "stop_listeners",
]

# The accept queue shared by every process serving a listener (capped by net.core.somaxconn).
_BACKLOG = 1024

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
    servers: list[asyncio.Server] = field(default_factory=list)
    context: ssl.SSLContext | None = None  # STARTTLS: read per connection, swapped on reload


@dataclass
class BoundListener:
    """The listening sockets of one ``listen:`` entry (several for a name like localhost)."""

    config: ListenerConfig
    sockets: list[socket.socket]


def _bind_tcp(listener: ListenerConfig) -> list[socket.socket]:
    """As asyncio's create_server binds: every address the host name resolves to, with
    SO_REUSEADDR, and IPv6 sockets IPv6-only (an IPv4 address gets its own socket)."""
    assert listener.tcp_port is not None
    infos = socket.getaddrinfo(
        listener.tcp_host or None,
        listener.tcp_port,
        type=socket.SOCK_STREAM,
        flags=socket.AI_PASSIVE,
    )
    bound: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            bound.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise OSError(
                    exc.errno, f"{listener.display}: cannot listen: {exc.strerror}"
                ) from None
            sock.listen(_BACKLOG)
            sock.setblocking(False)
    except BaseException:
        for sock in bound:
            sock.close()
        raise
    return bound


def _bind_unix(path: Path) -> socket.socket:
    clear_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        # Anyone may connect: the identity is the peer's uid (SO_PEERCRED), not the mode.
        os.chmod(path, 0o666)
        sock.listen(_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_listeners(listeners: Sequence[ListenerConfig]) -> list[BoundListener]:
    """Bind and listen on every listener (raises OSError naming the one that failed; those
    already bound are closed again). Nothing is served until ``start_listeners``."""
    bound: list[BoundListener] = []
    try:
        for listener in listeners:
            if listener.unix_path is not None:
                bound.append(BoundListener(listener, [_bind_unix(listener.unix_path)]))
            else:
                bound.append(BoundListener(listener, _bind_tcp(listener)))
    except BaseException:
        close_bound(bound)
        raise
    return bound


def close_bound(bound: Sequence[BoundListener], *, remove_paths: bool = True) -> None:
    """Close the sockets of ``bind_listeners`` (and remove the unix socket files)."""
    for entry in bound:
        for sock in entry.sockets:
            sock.close()
        if remove_paths and entry.config.unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                entry.config.unix_path.unlink()


def _plan_reload(
    current: Sequence[ListenerConfig], config: Config
) -> tuple[list[str], dict[str, tuple[ListenerConfig, ssl.SSLContext | None]]]:
    """Notes on what needs a restart, and per running listener its new config and context."""
    by_address = {listener.display: listener for listener in config.listeners}
    running = {listener.display for listener in current}
    notes = [
        f"{listener.display}: new listener, opened at the next start"
        for listener in config.listeners
        if listener.display not in running
    ]
    contexts: dict[str, tuple[ListenerConfig, ssl.SSLContext | None]] = {}
    for old in current:
        new = by_address.get(old.display)
        if new is None:
            notes.append(f"{old.display}: removed, closed at the next start")
        elif new.tls is not old.tls:
            notes.append(f"{new.display}: tls changed, takes effect at the next start")
        else:
            context = server_tls_context(new) if new.tls is not TlsMode.NONE else None
            contexts[old.display] = (new, context)
    return notes, contexts


class Listeners:
    """The running listeners of one process.

    ``owns_paths``: this process created the unix sockets and removes their files when it
    closes (an accepting process shares the main process's sockets and leaves them).
    """

    def __init__(
        self, handler: InboundHandler, *, owns_paths: bool = True, processes: int = 1
    ) -> None:
        """``processes``: how many processes accept on these listeners; each holds its share
        of ``client_connections.max``."""
        self.handler = handler
        self.owns_paths = owns_paths
        self.processes = max(1, processes)
        self._listeners: list[_Listener] = []
        self._connections: set[RelaySMTP] = set()  # open ones: each leaves at connection_lost

    @property
    def servers(self) -> list[asyncio.Server]:
        return [server for entry in self._listeners for server in entry.servers]

    @property
    def in_data(self) -> int:
        """Connections between 354 and their reply right now."""
        return sum(1 for c in self._connections if c.in_data)

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

    async def _start(self, bound: BoundListener) -> None:
        loop = asyncio.get_running_loop()
        listener = bound.config
        entry = _Listener(listener)
        self._listeners.append(entry)  # closed with the others if a later one fails
        implicit: ssl.SSLContext | None = None
        if listener.tls is TlsMode.STARTTLS:
            entry.context = server_tls_context(listener)
        elif listener.tls is TlsMode.IMPLICIT:
            implicit = entry.context = server_tls_context(listener)
        handler, connections = self.handler, self._connections

        def over_capacity() -> bool:
            share = -(-handler.config.client_connections.max // self.processes)
            return len(connections) > share  # the new connection is counted already

        def protocol() -> RelaySMTP:
            starttls = entry.context if listener.tls is TlsMode.STARTTLS else None
            smtp = RelaySMTP(
                handler,
                entry.config,  # replaced by reload()
                hostname=handler.config.helo_name,
                starttls_context=starttls,
                loop=loop,
                over_capacity=over_capacity,
                on_closed=connections.discard,
            )
            connections.add(smtp)
            return smtp

        for sock in bound.sockets:
            if listener.unix_path is not None:
                server = await loop.create_unix_server(protocol, sock=sock)
            else:
                server = await loop.create_server(
                    protocol,
                    sock=sock,
                    ssl=implicit,
                    ssl_handshake_timeout=30.0 if implicit is not None else None,
                )
            entry.servers.append(server)

    def reload(self, config: Config) -> list[str]:
        """Apply a reloaded config (SIGHUP) to the running listeners: certificates are
        re-read and ``auth:`` takes effect for new connections.

        Every certificate is loaded before any is used: a broken one raises (OSError,
        ssl.SSLError, ValueError) and the old settings keep serving. What only a restart can
        change (listeners added or removed, TLS turned on or off) is returned as notes.
        """
        notes, contexts = _plan_reload([e.config for e in self._listeners], config)
        for entry in self._listeners:
            if entry.config.display not in contexts:
                continue
            new, context = contexts[entry.config.display]
            if new.tls is TlsMode.STARTTLS:
                entry.context = context  # new connections get it; running ones keep theirs
            elif context is not None and entry.context is not None:
                # The implicit-TLS server holds its context: load the (verified) files into it.
                assert new.certificate is not None and new.private_key is not None
                entry.context.minimum_version = context.minimum_version
                entry.context.load_cert_chain(new.certificate, new.private_key)
            entry.config = new
        return notes

    @staticmethod
    def check_reload(bound: Sequence[BoundListener], config: Config) -> list[str]:
        """What ``reload`` would say, with every certificate loaded once to prove it works
        (raises like ``reload``): the main process's check before its accepting processes
        are told to reload."""
        return _plan_reload([b.config for b in bound], config)[0]

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
                await asyncio.wait_for(server.wait_closed(), timeout=1.0)
        for entry in self._listeners:
            if self.owns_paths and entry.config.unix_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    entry.config.unix_path.unlink()
        self._listeners.clear()


async def start_listeners(
    handler: InboundHandler,
    bound: Sequence[BoundListener],
    *,
    owns_paths: bool = True,
    processes: int = 1,
) -> Listeners:
    """Serve the ``bound`` sockets (from ``bind_listeners``). If any cannot be served (bad
    certificate), those already serving are closed and the error is raised."""
    listeners = Listeners(handler, owns_paths=owns_paths, processes=processes)
    try:
        for entry in bound:
            await listeners._start(entry)
    except BaseException:
        await listeners.close(grace=0)
        close_bound(bound, remove_paths=owns_paths)
        raise
    return listeners


async def stop_listeners(listeners: Listeners, timeout: float = 30.0) -> None:
    """SIGTERM: ``listeners.close(grace=timeout)``."""
    await listeners.close(grace=timeout)
