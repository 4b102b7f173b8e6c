"""sendmail's command line and message handling (pure parts of relayd.ops.sendmail)."""

from __future__ import annotations

import io

import pytest

from relayd.ops.sendmail import (
    SendmailArgs,
    UsageError,
    parse_args,
    prepare_message,
    read_message,
)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["-t", "-i"], SendmailArgs(extract=True, ignore_dots=True)),
        (
            ["-oi", "-f", "a@x.test", "b@y.test"],
            SendmailArgs(ignore_dots=True, sender="a@x.test", recipients=["b@y.test"]),
        ),
        (
            ["-fa@x.test", "-FCron Daemon", "-odi", "-oem", "-bm", "-B8BITMIME", "b@y.test"],
            SendmailArgs(sender="a@x.test", full_name="Cron Daemon", recipients=["b@y.test"]),
        ),
        (
            ["-r", "a@x.test", "-C", "/etc/relayd/relayd.yaml", "--", "-weird@y.test"],
            SendmailArgs(
                sender="a@x.test", config="/etc/relayd/relayd.yaml", recipients=["-weird@y.test"]
            ),
        ),
        (["b@y.test", "-t"], SendmailArgs(extract=True, recipients=["b@y.test"])),
        (["-bs"], SendmailArgs(smtp_mode=True)),
    ],
)
def test_parse_args(argv: list[str], expected: SendmailArgs) -> None:
    assert parse_args(argv) == expected


@pytest.mark.parametrize("argv", [["-X"], ["-f"], ["-bp"], ["-C"]])
def test_usage_errors(argv: list[str]) -> None:
    with pytest.raises(UsageError):
        parse_args(argv)


def test_without_i_a_lone_dot_ends_the_message() -> None:
    stream = io.BytesIO(b"Subject: s\n\nline\n.\nafter\n")
    assert read_message(stream, ignore_dots=False) == b"Subject: s\n\nline\n"
    stream = io.BytesIO(b"Subject: s\n\nline\n.\nafter\n")
    assert read_message(stream, ignore_dots=True) == b"Subject: s\n\nline\n.\nafter\n"


def test_t_takes_to_cc_bcc_and_removes_bcc() -> None:
    content = (
        b"To: A <a@x.test>, b@x.test\nCc: c@x.test\nBcc: Hidden <h@x.test>,\n"
        b" h2@x.test\nSubject: hi\n\nBcc: in the body stays\n"
    )
    out, rcpts = prepare_message(
        content, SendmailArgs(extract=True, recipients=["z@x.test"]), "me@x.test"
    )
    assert rcpts == ["z@x.test", "a@x.test", "b@x.test", "c@x.test", "h@x.test", "h2@x.test"]
    assert b"Bcc: Hidden" not in out and b"h2@x.test" not in out.split(b"\n\n")[0]
    assert out.endswith(b"\n\nBcc: in the body stays\n")
    assert out.startswith(b"To: A <a@x.test>, b@x.test\nCc: c@x.test\nSubject: hi\n")


def test_full_name_adds_a_from_only_when_missing() -> None:
    args = SendmailArgs(full_name='Cron "Daemon"', recipients=["b@x.test"])
    out, _ = prepare_message(b"Subject: s\n\nbody\n", args, "root")
    assert out.startswith(b'From: "Cron \\"Daemon\\"" <root>\nSubject: s\n')
    out, _ = prepare_message(b"From: me@x.test\n\nbody\n", args, "root")
    assert out == b"From: me@x.test\n\nbody\n"
    _, rcpts = prepare_message(
        b"To: B@x.test\n\n", SendmailArgs(extract=True, recipients=["b@x.test"]), "root"
    )
    assert rcpts == ["b@x.test"]  # the same recipient once
