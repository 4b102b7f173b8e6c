"""SPEC "Delivery": the retry schedule, and what each upstream reply or failure means."""

from __future__ import annotations

import pytest
from factories import DEFAULT_RETRY

from relayd.config.model import RetryPolicy
from relayd.core.outcome import (
    Failure,
    FailureKind,
    Phase,
    Reply,
    Verdict,
    classify_failure,
    classify_reply,
    is_credential_refusal,
    is_send_as_refusal,
)
from relayd.core.retry import JITTER, expired, next_delay

# -- retry ------------------------------------------------------------------------------------

P = DEFAULT_RETRY  # first 300 s, max 3600 s, give up after 5 days


@pytest.mark.parametrize(
    ("attempts", "random_unit", "expected"),
    [
        # First retry: retry.first, ±20 %.
        (1, 0.0, 240.0),
        (1, 0.5, 300.0),
        (1, 0.999, 300.0 * 1.1996),
        # Doubling.
        (2, 0.5, 600.0),
        (3, 0.5, 1200.0),
        (4, 0.5, 2400.0),
        (4, 0.0, 1920.0),
        # Capped at retry.max (jitter still applies around the cap).
        (5, 0.5, 3600.0),
        (5, 0.0, 2880.0),
        (5, 0.999, 3600.0 * 1.1996),
        (12, 0.5, 3600.0),
        (60, 0.999, 3600.0 * 1.1996),
        # attempts < 1 is treated as the first retry, never a shorter one.
        (0, 0.5, 300.0),
    ],
)
def test_next_delay_table(attempts: int, random_unit: float, expected: float) -> None:
    assert next_delay(P, attempts, random_unit) == pytest.approx(expected)


@pytest.mark.parametrize(
    "policy",
    [
        DEFAULT_RETRY,
        RetryPolicy(first=60.0, max=86400.0, give_up_after=7 * 86400.0),  # nullmailer
        RetryPolicy(first=300.0, max=4000.0, give_up_after=5 * 86400.0),  # Postfix
        RetryPolicy(first=60.0, max=60.0, give_up_after=86400.0),
    ],
)
def test_next_delay_bounds_and_growth(policy: RetryPolicy) -> None:
    previous = {0.0: 0.0, 0.999: 0.0}
    for attempts in range(1, 41):
        base = min(policy.first * 2 ** (attempts - 1), policy.max)
        low = next_delay(policy, attempts, 0.0)
        high = next_delay(policy, attempts, 0.999)
        assert low == pytest.approx(base * (1 - JITTER))
        assert high == pytest.approx(base * (1 - JITTER + 2 * JITTER * 0.999))
        assert base * 0.8 - 1e-9 <= low < high < base * 1.2
        assert high <= policy.max * 1.2
        # Never shrinks as attempts grow (for the same draw).
        assert low >= previous[0.0]
        assert high >= previous[0.999]
        previous = {0.0: low, 0.999: high}
    # The cap is reached and held.
    assert next_delay(policy, 40, 0.5) == pytest.approx(policy.max)


def test_jitter_spreads_a_backlog() -> None:
    delays = {round(next_delay(P, 3, u / 100), 6) for u in range(100)}
    assert len(delays) == 100
    assert min(delays) == pytest.approx(1200 * 0.8)
    assert max(delays) == pytest.approx(1200 * (0.8 + 0.4 * 0.99))


@pytest.mark.parametrize("attempts", [1025, 5000])
def test_next_delay_survives_many_attempts(attempts: int) -> None:
    policy = RetryPolicy(first=60.0, max=60.0, give_up_after=5 * 86400.0)
    assert next_delay(policy, attempts, 0.5) == pytest.approx(60.0)


@pytest.mark.parametrize(
    ("age", "expected"),
    [
        (0.0, False),
        (P.give_up_after - 1.0, False),
        (P.give_up_after, True),
        (P.give_up_after + 1.0, True),
        (30 * 86400.0, True),
        (-60.0, False),  # a clock step backwards never expires mail
    ],
)
def test_expired(age: float, expected: bool) -> None:
    received = 1_700_000_000.0
    assert expired(P, received, received + age) is expected


# -- outcome ------------------------------------------------------------------------------------

D, F, B, H = Verdict.DELIVERED, Verdict.DEFERRED, Verdict.BOUNCED, Verdict.HELD


@pytest.mark.parametrize(
    ("phase", "code", "text", "verdict"),
    [
        (Phase.DATA, 250, "2.0.0 OK: queued as 4F1x", D),
        # Only the final reply to DATA means delivered; a positive reply where a step failed
        # (250 to AUTH from a broken server, a 2xx read at MAIL/RCPT) leaves the mail waiting.
        (Phase.RCPT, 250, "2.1.5 Recipient OK", F),
        (Phase.MAIL, 250, "2.1.0 Sender OK", F),
        (Phase.AUTH, 250, "2.0.0 Ok", F),
        (Phase.DATA, 354, "End data with <CR><LF>.<CR><LF>", F),
        (Phase.CONNECT, 421, "4.3.2 Service not available", F),
        (Phase.MAIL, 421, "4.7.0 Too many connections", F),
        (Phase.RCPT, 450, "4.2.1 Mailbox busy", F),
        (Phase.RCPT, 451, "4.3.0 Temporary failure", F),
        (Phase.RCPT, 452, "4.5.3 Too many recipients", F),
        (Phase.DATA, 451, "4.4.1 Timeout", F),
        (Phase.DATA, 452, "4.3.1 Insufficient system storage", F),
        (Phase.AUTH, 454, "4.7.0 Temporary authentication failure", F),
        (Phase.AUTH, 421, "4.7.0 Try again later", F),
        (Phase.RCPT, 550, "5.1.1 User unknown", B),
        (Phase.RCPT, 554, "5.7.1 Relay access denied", B),
        (Phase.RCPT, 553, "5.1.3 Bad recipient address syntax", B),
        (Phase.DATA, 554, "5.6.0 Message rejected", B),
        (Phase.DATA, 552, "5.3.4 Message too big", B),
        (Phase.MAIL, 550, "5.7.1 Sender rejected", B),
        # Credentials refused: held (the account decides pause, not the message).
        (Phase.AUTH, 535, "5.7.8 Username and Password not accepted", H),
        (Phase.AUTH, 534, "5.7.9 Application-specific password required", H),
        (
            Phase.AUTH,
            535,
            "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled",
            H,
        ),
        (Phase.AUTH, 535, "Authentication failed", H),
        (Phase.MAIL, 530, "5.7.57 Client not authenticated to send mail", H),
        # Other permanent AUTH replies (mechanism, encryption) are configuration problems.
        (Phase.AUTH, 504, "5.5.4 Unrecognized authentication type", H),
        (Phase.AUTH, 538, "5.7.11 Encryption required", H),
        # Microsoft SendAsDenied: this message bounces (and alerts), the account is fine.
        (Phase.DATA, 554, "5.2.252 SendAsDenied; alice@acme.example not allowed to send", B),
        (Phase.MAIL, 554, "5.2.252 SendAsDenied; alice@acme.example not allowed to send", B),
        # A 5xx greeting, EHLO or TLS refusal is about us, not the message.
        (Phase.CONNECT, 554, "5.3.2 No SMTP service here", F),
        (Phase.CONNECT, 550, "Go away", F),
        (Phase.EHLO, 550, "5.7.1 Access denied", F),
        (Phase.EHLO, 501, "5.5.4 Invalid domain name", F),
        (Phase.TLS, 554, "5.7.3 TLS not available", F),
    ],
)
def test_classify_reply_table(phase: Phase, code: int, text: str, verdict: Verdict) -> None:
    assert classify_reply(phase, Reply(code, text)) is verdict


@pytest.mark.parametrize(
    ("phase", "code", "text", "expected"),
    [
        (Phase.AUTH, 535, "5.7.8 Bad credentials", True),
        (Phase.AUTH, 534, "5.7.9 Please log in with an app password", True),
        (Phase.AUTH, 535, "5.7.139 Authentication unsuccessful", True),
        (Phase.MAIL, 530, "5.7.57 Client not authenticated", True),
        (Phase.RCPT, 550, "5.1.1 User unknown", False),
        (Phase.AUTH, 454, "4.7.0 Temporary failure", False),
    ],
)
def test_is_credential_refusal(phase: Phase, code: int, text: str, expected: bool) -> None:
    assert is_credential_refusal(phase, Reply(code, text)) is expected


@pytest.mark.parametrize(
    ("code", "text", "expected"),
    [
        (554, "5.2.252 SendAsDenied; bob@acme.example not allowed to send as alice@", True),
        (550, "5.2.252 Not allowed to send as this sender", True),
        (554, "SendAsDenied", True),
        (554, "5.7.1 Relay access denied", False),
        (550, "5.1.1 User unknown", False),
        (535, "5.7.8 Bad credentials", False),
    ],
)
def test_is_send_as_refusal(code: int, text: str, expected: bool) -> None:
    assert is_send_as_refusal(Reply(code, text)) is expected


def test_send_as_denied_bounces_and_is_flagged() -> None:
    reply = Reply(554, "5.2.252 SendAsDenied; alice@acme.example not allowed to send as x")
    assert classify_reply(Phase.DATA, reply) is Verdict.BOUNCED
    assert is_send_as_refusal(reply)
    assert not is_credential_refusal(Phase.DATA, reply)
    assert reply.enhanced == "5.2.252"


@pytest.mark.parametrize(
    ("code", "text", "enhanced"),
    [
        (250, "2.0.0 OK: queued as X", "2.0.0"),
        (250, "OK", "2.0.0"),
        (221, "Bye", "2.0.0"),
        (421, "4.7.0 Too many connections", "4.7.0"),
        (451, "Try again later", "4.0.0"),
        (535, "5.7.8 Username and Password not accepted", "5.7.8"),
        (535, "5.7.139 Authentication unsuccessful", "5.7.139"),
        (554, "5.2.252 SendAsDenied; x", "5.2.252"),
        (550, "  5.1.1 leading blanks", "5.1.1"),
        (550, "Mailbox unavailable", "5.0.0"),
        (550, "", "5.0.0"),
        # An enhanced code whose class contradicts the reply code is not trusted.
        (451, "5.7.1 contradicts the basic code", "4.0.0"),
        (550, "2.0.0 contradicts the basic code", "5.0.0"),
        # Subjects and details have at most three digits (RFC 3463).
        (550, "5.1.1234 too long", "5.0.0"),
        (550, "5.1 too short", "5.0.0"),
        (550, "user 5.1.1 not at the start", "5.0.0"),
    ],
)
def test_reply_enhanced(code: int, text: str, enhanced: str) -> None:
    assert Reply(code, text).enhanced == enhanced


@pytest.mark.parametrize(
    ("reply", "text"),
    [(Reply(250, "2.0.0 OK"), "250 2.0.0 OK"), (Reply(550, ""), "550")],
)
def test_reply_str(reply: Reply, text: str) -> None:
    assert str(reply) == text


# Credentials that cannot be used, said by relayd or the token endpoint rather than the mail
# server (no consent stored, invalid_grant; no login mechanism for them; an HTTP API's 403):
# held, as a 535 is.
CREDENTIAL_FAILURES = {FailureKind.CONSENT, FailureKind.NO_MECHANISM, FailureKind.PERMISSION}


@pytest.mark.parametrize("kind", [k for k in FailureKind if k not in CREDENTIAL_FAILURES])
@pytest.mark.parametrize("phase", list(Phase))
def test_classify_failure_defers_network_tls_and_protocol_failures(
    phase: Phase, kind: FailureKind
) -> None:
    failure = Failure(phase, kind, "detail")
    assert classify_failure(failure) is Verdict.DEFERRED
    assert failure.enhanced.startswith("4.")
    assert str(failure) == f"{kind.value} during {phase.value}: detail"


@pytest.mark.parametrize("kind", [k for k in FailureKind if k in CREDENTIAL_FAILURES])
@pytest.mark.parametrize("phase", [Phase.TOKEN, Phase.AUTH])
def test_classify_failure_holds_unusable_credentials(phase: Phase, kind: FailureKind) -> None:
    failure = Failure(phase, kind, "detail")
    assert classify_failure(failure) is Verdict.HELD
    assert failure.enhanced.startswith("4.")  # held, not bounced: never a 5xx DSN code
    if kind is FailureKind.CONSENT:
        # Not "535 ...": no mail server said anything (relayd or the token endpoint did).
        assert str(failure) == "no consent from the mailbox owner: detail"
    if kind is FailureKind.PERMISSION:
        assert str(failure) == "refused by the provider: detail"


@pytest.mark.parametrize(
    ("kind", "enhanced"),
    [
        (FailureKind.NETWORK, "4.4.2"),
        (FailureKind.TIMEOUT, "4.4.2"),
        (FailureKind.TLS, "4.7.0"),
        (FailureKind.NO_STARTTLS, "4.7.0"),
    ],
)
def test_failure_enhanced(kind: FailureKind, enhanced: str) -> None:
    assert Failure(Phase.CONNECT, kind, "x").enhanced == enhanced
