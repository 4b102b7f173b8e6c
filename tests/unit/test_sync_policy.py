"""The filing step's policy: who gets a Sent copy, where DSNs go, retries and giving up."""

from __future__ import annotations

import dataclasses

import pytest
from factories import DEFAULT_RETRY, make_account

from relayd.config.model import AccountConfig, ImapServer, SentCopy, TlsMode
from relayd.config.presets import PRESETS
from relayd.core.envelope import DeliveryState
from relayd.core.sentcopy import (
    Filing,
    FilingJob,
    Folder,
    awaits_filing,
    dsn_filing,
    job_of,
    plan_after_failure,
    sent_copy_filing,
    with_job,
)

IMAP = ImapServer("imap.host.example", 993, TlsMode.IMPLICIT, None, None, None, None)


def account(provider: str, sent_copy: SentCopy, *, imap: bool = True) -> AccountConfig:
    base = make_account("info@host.example", provider=provider)
    if provider == "capture":
        return dataclasses.replace(base, sent_copy=sent_copy)
    preset = PRESETS[provider]
    server = (preset.imap or IMAP) if imap else None
    return dataclasses.replace(base, sent_copy=sent_copy, imap=server)


@pytest.mark.parametrize(
    ("provider", "sent_copy", "expected"),
    [
        # auto: skip the providers that file SMTP mail in Sent themselves (Gmail, Microsoft 365).
        ("gmail", SentCopy.AUTO, Filing.NONE),
        ("google-workspace", SentCopy.AUTO, Filing.NONE),
        ("microsoft365", SentCopy.AUTO, Filing.NONE),
        ("outlook", SentCopy.AUTO, Filing.NONE),
        ("icloud", SentCopy.AUTO, Filing.IMAP),
        ("yahoo", SentCopy.AUTO, Filing.IMAP),
        ("fastmail", SentCopy.AUTO, Filing.IMAP),
        ("zoho", SentCopy.AUTO, Filing.IMAP),
        ("custom", SentCopy.AUTO, Filing.IMAP),
        ("capture", SentCopy.AUTO, Filing.CAPTURE),
        # always / never say so.
        ("gmail", SentCopy.ALWAYS, Filing.IMAP),
        ("microsoft365", SentCopy.ALWAYS, Filing.IMAP),
        ("fastmail", SentCopy.NEVER, Filing.NONE),
        ("custom", SentCopy.NEVER, Filing.NONE),
        ("capture", SentCopy.NEVER, Filing.NONE),
    ],
)
def test_sent_copy_filing(provider: str, sent_copy: SentCopy, expected: Filing) -> None:
    assert sent_copy_filing(account(provider, sent_copy)) is expected


def test_no_imap_means_no_copy() -> None:
    assert sent_copy_filing(account("custom", SentCopy.AUTO, imap=False)) is Filing.NONE
    assert sent_copy_filing(account("custom", SentCopy.ALWAYS, imap=False)) is Filing.NONE


@pytest.mark.parametrize(
    ("provider", "imap", "expected"),
    [
        ("custom", True, Filing.IMAP),
        ("custom", False, Filing.NONE),
        # SPEC "DSNs": into the INBOX whenever the account has IMAP, whatever sent_copy says.
        ("gmail", True, Filing.IMAP),
        ("capture", False, Filing.NONE),
    ],
)
def test_dsn_filing(provider: str, imap: bool, expected: Filing) -> None:
    assert dsn_filing(account(provider, SentCopy.NEVER, imap=imap)) is expected


def test_job_rides_in_the_delivery_state() -> None:
    state = DeliveryState(delivered=("bob@example.net",), delivered_at=1000.0, extra={"x": 1})
    assert not awaits_filing(state) and job_of(state) is None
    job = FilingJob(Folder.SENT, attempts=2, next_attempt_at=5.0, append_issued=True)
    filed = with_job(state, job)
    assert awaits_filing(filed)
    assert filed.extra["x"] == 1
    again = DeliveryState.from_json(filed.to_json())
    assert job_of(again) == job


def test_unreadable_job_assumes_an_append_may_have_landed() -> None:
    state = DeliveryState(extra={"filing": "garbage"})
    job = job_of(state)
    assert job is not None and job.append_issued


def test_failure_retries_on_the_spool_schedule() -> None:
    job = FilingJob(Folder.SENT)
    first = plan_after_failure(
        job, started_at=1000.0, now=1010.0, policy=DEFAULT_RETRY, random_unit=0.5, error="down"
    )
    assert not first.give_up
    assert first.job.attempts == 1 and first.job.last_error == "down"
    assert first.job.next_attempt_at == 1010.0 + DEFAULT_RETRY.first
    second = plan_after_failure(
        first.job, started_at=1000.0, now=2000.0, policy=DEFAULT_RETRY, random_unit=0.5, error="x"
    )
    assert second.job.attempts == 2
    assert second.job.next_attempt_at == 2000.0 + 2 * DEFAULT_RETRY.first


def test_failure_after_the_lifetime_gives_up() -> None:
    job = FilingJob(Folder.SENT, attempts=40, append_issued=True)
    late = 1000.0 + DEFAULT_RETRY.give_up_after
    decision = plan_after_failure(
        job, started_at=1000.0, now=late, policy=DEFAULT_RETRY, random_unit=0.1, error="down"
    )
    assert decision.give_up and decision.job.attempts == 41
    just_before = plan_after_failure(
        job, started_at=1000.0, now=late - 1, policy=DEFAULT_RETRY, random_unit=0.1, error="down"
    )
    assert not just_before.give_up


def test_permanent_failure_gives_up_at_once() -> None:
    decision = plan_after_failure(
        FilingJob(Folder.SENT),
        started_at=1000.0,
        now=1001.0,
        policy=DEFAULT_RETRY,
        random_unit=0.5,
        error="[TOOBIG]",
        permanent=True,
    )
    assert decision.give_up
