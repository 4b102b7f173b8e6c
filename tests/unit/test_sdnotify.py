"""sd_notify(3) datagrams: delivered when systemd listens, never a stalled event loop."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from relayd.sdnotify import notify


def test_fields_arrive_in_one_datagram(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert notify("READY=1", "STATUS=accepting") is True
        assert listener.recv(4096) == b"READY=1\nSTATUS=accepting"


def test_without_systemd_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False


def test_a_socket_that_does_not_drain_loses_the_line_instead_of_blocking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        listener.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        sent = [notify("STATUS=" + "x" * 512) for _ in range(10_000)]
        assert sent[0] is True and sent[-1] is False  # a blocking send would hang here
