"""What happens to a message after an attempt (plan_after_attempt), and to its account."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from factories import DEFAULT_RETRY, make_envelope

from relayd.core.envelope import DeliveryState, Envelope
from relayd.core.health import (
    PAUSE_AFTER_REFUSALS,
    UNHEALTHY_AFTER_FAILURES,
    AccountHealth,
    AccountState,
)
from relayd.core.outcome import Verdict
from relayd.core.retry import next_delay
from relayd.core.states import Plan, RecipientResult, Target, plan_after_attempt
from relayd.spool.accounts import AccountStore

P = DEFAULT_RETRY
RECEIVED = 1_700_000_000.0
NOW = RECEIVED + 600.0
RELAY = "smtp.test.example:465"
A, B, C = "a@dest.example", "b@dest.example", "c@dest.example"
ENV = make_envelope(recipients=(A, B, C), received_at=RECEIVED)

D, F, X, H = Verdict.DELIVERED, Verdict.DEFERRED, Verdict.BOUNCED, Verdict.HELD
_DEFAULTS = {
    D: ("2.0.0", "250 2.0.0 OK queued"),
    F: ("4.2.0", "451 4.2.0 try again later"),
    X: ("5.1.1", "550 5.1.1 user unknown"),
    H: ("5.7.8", "535 5.7.8 credentials rejected"),
}


def res(recipient: str, verdict: Verdict, status: str = "", reply: str = "") -> RecipientResult:
    d_status, d_reply = _DEFAULTS[verdict]
    reply = reply or f"{d_reply} <{recipient}>"
    return RecipientResult(recipient, verdict, status or d_status, reply)


def plan(
    results: list[RecipientResult],
    state: DeliveryState | None = None,
    *,
    now: float = NOW,
    random_unit: float = 0.5,
    paused: bool = False,
    envelope: Envelope = ENV,
    delay_warning: float = 0.0,
) -> Plan:
    return plan_after_attempt(
        envelope,
        state or DeliveryState(),
        results,
        now=now,
        policy=P,
        random_unit=random_unit,
        relay=RELAY,
        account_paused=paused,
        delay_warning=delay_warning,
    )


# -- plan_after_attempt ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("verdicts", "target", "delivered", "bounced"),
    [
        ((D, D, D), Target.DONE, (A, B, C), ()),
        ((X, X, X), Target.DONE, (), (A, B, C)),
        ((D, X, X), Target.DONE, (A,), (B, C)),
        ((D, X, F), Target.DEFERRED, (A,), (B,)),
        ((F, D, X), Target.DEFERRED, (B,), (C,)),
        ((D, F, F), Target.DEFERRED, (A,), ()),
        ((F, F, F), Target.DEFERRED, (), ()),
        ((H, H, H), Target.DEFERRED, (), ()),  # first refusal: not paused, so deferred
    ],
)
def test_plan_per_recipient(
    verdicts: tuple[Verdict, ...],
    target: Target,
    delivered: tuple[str, ...],
    bounced: tuple[str, ...],
) -> None:
    results = [res(r, v) for r, v in zip((A, B, C), verdicts, strict=True)]
    p = plan(results)
    assert p.target is target
    assert p.expired is False
    assert p.state.delivered == delivered
    assert p.state.bounced == bounced
    # Only the refused recipients bounce (get a DSN); delivered ones never do.
    assert tuple(r.recipient for r in p.bounce) == bounced
    assert all(r.verdict is Verdict.BOUNCED for r in p.bounce)
    waiting = tuple(r for r, v in zip((A, B, C), verdicts, strict=True) if v in (F, H))
    assert p.state.pending(ENV) == waiting
    assert p.state.attempts == 1
    assert p.state.first_attempt_at == NOW
    assert p.state.relay == RELAY
    assert p.state.last_reply == results[-1].reply
    if target is Target.DONE:
        assert p.state.delivered_at == (NOW if delivered else None)
    else:
        assert p.state.delivered_at is None
        assert p.state.next_attempt_at == pytest.approx(NOW + next_delay(P, 1, 0.5))


def test_all_delivered_is_done() -> None:
    p = plan([res(A, D), res(B, D), res(C, D)])
    assert p.target is Target.DONE
    assert p.bounce == ()
    assert p.state.pending(ENV) == ()
    assert p.state.delivered_at == NOW


@pytest.mark.parametrize(
    ("prior_attempts", "random_unit", "delay"),
    [
        (0, 0.5, 300.0),
        (0, 0.0, 240.0),
        (0, 0.999, 300.0 * 1.1996),
        (1, 0.5, 600.0),
        (2, 0.999, 1200.0 * 1.1996),
        (3, 0.0, 1920.0),
        (10, 0.5, 3600.0),
        (10, 0.999, 3600.0 * 1.1996),
    ],
)
def test_next_attempt_uses_the_policy(
    prior_attempts: int, random_unit: float, delay: float
) -> None:
    state = DeliveryState(attempts=prior_attempts, first_attempt_at=RECEIVED + 1)
    p = plan([res(A, F), res(B, F), res(C, F)], state, random_unit=random_unit)
    assert p.target is Target.DEFERRED
    assert p.state.attempts == prior_attempts + 1
    assert p.state.next_attempt_at == pytest.approx(NOW + delay)
    assert p.state.first_attempt_at == RECEIVED + 1  # kept from the first attempt


def test_follow_up_attempt_keeps_earlier_outcomes() -> None:
    first = plan([res(A, D), res(B, X), res(C, F)])
    assert first.state.pending(ENV) == (C,)
    later = NOW + 1000.0
    second = plan([res(C, D)], first.state, now=later)
    assert second.target is Target.DONE
    assert second.state.delivered == (A, C)
    assert second.state.bounced == (B,)
    assert second.bounce == ()  # B got its DSN after the first attempt, not again
    assert second.state.attempts == 2
    assert second.state.first_attempt_at == NOW
    assert second.state.delivered_at == later
    assert second.state.pending(ENV) == ()


def test_plan_does_not_change_the_given_state() -> None:
    state = DeliveryState(attempts=1, first_attempt_at=NOW, delivered=(A,))
    snapshot = DeliveryState.from_json(state.to_json())
    plan([res(B, X), res(C, F)], state)
    assert state == snapshot


@pytest.mark.parametrize("age", [P.give_up_after, P.give_up_after + 3600.0, 30 * 86400.0])
def test_expired_lifetime_bounces_the_remaining_recipients(age: float) -> None:
    state = DeliveryState(attempts=40, first_attempt_at=RECEIVED + 1, delivered=(A,))
    results = [
        res(B, F, "4.2.0", "451 4.2.0 mailbox busy"),
        res(C, F, "5.7.1", "554 5.7.1 EHLO refused"),  # a 5xx at EHLO is deferred
    ]
    p = plan(results, state, now=RECEIVED + age)
    assert p.target is Target.DONE
    assert p.expired is True
    assert p.state.delivered == (A,)
    assert p.state.bounced == (B, C)
    assert p.state.pending(ENV) == ()
    assert [r.recipient for r in p.bounce] == [B, C]
    assert all(r.verdict is Verdict.BOUNCED for r in p.bounce)
    assert [r.status for r in p.bounce] == ["4.4.7", "5.7.1"]
    assert "451 4.2.0 mailbox busy" in p.bounce[0].reply
    assert "expired" in p.bounce[0].reply


def test_expiry_with_a_refused_recipient_in_the_same_attempt() -> None:
    p = plan([res(A, D), res(B, X), res(C, F)], now=RECEIVED + P.give_up_after)
    assert p.target is Target.DONE
    assert p.expired is True
    assert {r.recipient: r.status for r in p.bounce} == {B: "5.1.1", C: "4.4.7"}
    assert p.state.delivered == (A,)


def test_not_expired_one_second_before_the_lifetime() -> None:
    p = plan([res(A, F), res(B, F), res(C, F)], now=RECEIVED + P.give_up_after - 1.0)
    assert p.target is Target.DEFERRED
    assert p.expired is False
    assert p.bounce == ()


@pytest.mark.parametrize("age", [600.0, P.give_up_after, 365 * 86400.0])
def test_held_with_paused_account_is_hold_and_never_expires(age: float) -> None:
    state = DeliveryState(attempts=3, first_attempt_at=RECEIVED + 1, delivered=(A,))
    p = plan([res(B, H), res(C, H)], state, now=RECEIVED + age, paused=True)
    assert p.target is Target.HOLD
    assert p.expired is False
    assert p.bounce == ()
    assert p.state.next_attempt_at == 0.0
    assert p.state.delivered == (A,)
    assert p.state.bounced == ()
    assert p.state.pending(ENV) == (B, C)
    assert p.state.attempts == 4


def test_held_without_pause_is_deferred() -> None:
    p = plan([res(A, H), res(B, H), res(C, H)], paused=False, random_unit=0.0)
    assert p.target is Target.DEFERRED
    assert p.expired is False
    assert p.bounce == ()
    assert p.state.next_attempt_at == pytest.approx(NOW + 240.0)
    assert p.state.pending(ENV) == (A, B, C)


def test_paused_flag_without_held_results_does_not_hold() -> None:
    p = plan([res(A, F), res(B, F), res(C, F)], paused=True)
    assert p.target is Target.DEFERRED


# -- the records' JSON forms ---------------------------------------------------------------------


# -- spool.delay_warning -------------------------------------------------------------------------

FOUR_HOURS = 4 * 3600.0


def test_a_message_deferred_past_delay_warning_earns_one_warning() -> None:
    results = [res(A, D), res(B, F), res(C, X)]
    early = plan(results, now=RECEIVED + FOUR_HOURS - 1, delay_warning=FOUR_HOURS)
    assert early.delayed == () and not early.state.delay_warned
    first = plan(results, now=RECEIVED + FOUR_HOURS, delay_warning=FOUR_HOURS)
    assert first.target is Target.DEFERRED
    assert [r.recipient for r in first.delayed] == [B]  # the one still waiting, no other
    assert first.delayed[0].status == "4.2.0" and first.state.delay_warned
    again = plan([res(B, F)], first.state, now=RECEIVED + 2 * FOUR_HOURS, delay_warning=FOUR_HOURS)
    assert again.delayed == () and again.state.delay_warned  # one warning, not one per try


@pytest.mark.parametrize("case", ["off", "a DSN", "held", "done", "expired"])
def test_no_delay_warning(case: str) -> None:
    late = RECEIVED + FOUR_HOURS
    if case == "off":
        p = plan([res(A, F)], now=late, delay_warning=0.0)
    elif case == "a DSN":
        dsn = make_envelope(recipients=(A,), received_at=RECEIVED, is_dsn=True)
        p = plan([res(A, F)], now=late, envelope=dsn, delay_warning=FOUR_HOURS)
    elif case == "held":
        p = plan([res(A, H)], now=late, paused=True, delay_warning=FOUR_HOURS)
    elif case == "done":
        p = plan([res(A, D), res(B, D), res(C, X)], now=late, delay_warning=FOUR_HOURS)
    else:
        p = plan([res(A, F)], now=RECEIVED + P.give_up_after, delay_warning=FOUR_HOURS)
    assert p.delayed == ()
    assert not p.state.delay_warned


@pytest.mark.parametrize(
    "envelope",
    [
        ENV,
        make_envelope(recipients=("jörg@bücher.example", "b@x.example"), smtputf8=True),
        make_envelope(recipients=(), is_dsn=True, sender=""),
    ],
)
def test_envelope_json_round_trip(envelope: Envelope) -> None:
    raw = envelope.to_json()
    raw.decode("ascii")  # always ASCII on disk
    assert b"\n" not in raw
    assert Envelope.from_json(raw) == envelope


def test_delivery_state_json_round_trip() -> None:
    state = DeliveryState(
        attempts=3,
        first_attempt_at=NOW,
        next_attempt_at=NOW + 600,
        delivered=(A,),
        bounced=("jörg@bücher.example",),
        last_reply="451 4.2.0 later",
        delivered_at=None,
        relay=RELAY,
        extra={"k": "v"},
    )
    raw = state.to_json()
    raw.decode("ascii")
    assert DeliveryState.from_json(raw) == state
    assert DeliveryState.from_json(b"{}") == DeliveryState()


# -- account health ------------------------------------------------------------------------------

T0 = 1_700_000_000.0
PROBE = 3600.0


def fresh() -> AccountHealth:
    return AccountHealth("alice@acme.example", credentials_fingerprint="fp-1")


def test_pause_constants_match_spec() -> None:
    assert PAUSE_AFTER_REFUSALS == 2
    assert UNHEALTHY_AFTER_FAILURES == 3


def test_one_credential_refusal_does_not_pause() -> None:
    h = fresh().on_credentials_refused(T0, "535 5.7.8 bad", probe_after=PROBE)
    assert h.state is AccountState.DEFERRED
    assert not h.paused
    assert h.credential_refusals == 1
    assert h.accepting_attempts(T0)
    assert h.last_error == "535 5.7.8 bad"
    assert h.last_error_at == T0


def test_two_consecutive_credential_refusals_pause() -> None:
    h = fresh().on_credentials_refused(T0, "535 5.7.8 bad", probe_after=PROBE)
    h = h.on_credentials_refused(T0 + 300, "535 5.7.8 bad", probe_after=PROBE)
    assert h.paused
    assert h.state is AccountState.PAUSED
    assert h.paused_at == T0 + 300
    assert h.retry_at == T0 + 300 + PROBE
    assert "535 5.7.8 bad" in h.reason
    # Paused: no delivery attempt at all (probes are separate), not even after retry_at.
    for t in (T0 + 300, h.retry_at, h.retry_at + 10 * PROBE):
        assert not h.accepting_attempts(t)
    # A further refusal (failed probe) keeps the original pause time.
    again = h.on_credentials_refused(T0 + 5000, "535 5.7.8 bad", probe_after=PROBE)
    assert again.paused
    assert again.paused_at == T0 + 300
    assert again.retry_at == T0 + 5000 + PROBE


@pytest.mark.parametrize(
    "between",
    [
        lambda h: h.on_success(T0 + 100),
        lambda h: h.on_message_failure(T0 + 100, "550 5.1.1 user unknown"),
        lambda h: h.on_released(),
    ],
    ids=["success", "message-failure", "released"],
)
def test_refusals_must_be_consecutive(between: object) -> None:
    h = fresh().on_credentials_refused(T0, "535 bad", probe_after=PROBE)
    h = between(h)  # type: ignore[operator]
    assert h.credential_refusals == 0
    h = h.on_credentials_refused(T0 + 200, "535 bad", probe_after=PROBE)
    assert not h.paused
    assert h.state is AccountState.DEFERRED


def test_success_resets_a_pause() -> None:
    h = fresh()
    for t in (T0, T0 + 1):
        h = h.on_credentials_refused(t, "535 bad", probe_after=PROBE)
    h = h.but_alerted(T0 + 1)
    assert h.paused
    ok = h.on_success(T0 + 4000)
    assert ok.state is AccountState.OK
    assert not ok.paused
    assert ok.credential_refusals == 0
    assert ok.paused_at is None
    assert ok.alerted_at is None  # a new incident alerts again
    assert ok.retry_at == 0.0
    assert ok.last_success_at == T0 + 4000
    assert ok.accepting_attempts(T0 + 4000)


def test_connection_failures_make_the_account_unhealthy_after_three() -> None:
    h = fresh()
    retry_after = 900.0
    for n in (1, 2):
        h = h.on_connection_failure(T0 + n, "network during connect: refused", retry_after)
        assert h.state is AccountState.DEFERRED
        assert h.connection_failures == n
        assert h.retry_at == 0.0
        assert h.accepting_attempts(T0 + n)
    h = h.on_connection_failure(T0 + 3, "timeout during ehlo", retry_after)
    assert h.state is AccountState.UNHEALTHY
    assert h.connection_failures == 3
    assert h.retry_at == T0 + 3 + retry_after
    assert h.reason == "timeout during ehlo"
    assert not h.accepting_attempts(T0 + 3)
    assert not h.accepting_attempts(h.retry_at - 0.001)
    assert h.accepting_attempts(h.retry_at)
    assert h.accepting_attempts(h.retry_at + 1)
    # A failed probe keeps it unhealthy, with a new wait.
    h2 = h.on_connection_failure(T0 + 2000, "still down", 1800.0)
    assert h2.state is AccountState.UNHEALTHY
    assert h2.retry_at == T0 + 2000 + 1800.0
    assert not h2.accepting_attempts(T0 + 2000)
    # A success makes it healthy at once.
    ok = h2.on_success(T0 + 4000)
    assert ok.state is AccountState.OK
    assert ok.connection_failures == 0
    assert ok.accepting_attempts(T0 + 4000)


def test_success_resets_the_connection_failure_streak() -> None:
    h = fresh()
    for n in (1, 2):
        h = h.on_connection_failure(T0 + n, "refused", 900.0)
    h = h.on_success(T0 + 10)
    for n in (11, 12):
        h = h.on_connection_failure(T0 + n, "refused", 900.0)
    assert h.state is AccountState.DEFERRED
    assert h.accepting_attempts(T0 + 12)


def test_connection_failure_while_paused_stays_paused() -> None:
    h = fresh()
    for t in (T0, T0 + 1):
        h = h.on_credentials_refused(t, "535 bad", probe_after=PROBE)
    after = h.on_connection_failure(T0 + 50, "refused", 900.0)
    assert after.paused
    assert after.paused_at == h.paused_at
    assert after.last_error == "refused"


def test_changed_credentials_release_a_pause() -> None:
    h = fresh()
    for t in (T0, T0 + 1):
        h = h.on_credentials_refused(t, "535 bad", probe_after=PROBE)
    assert h.paused
    same = h.on_credentials_changed("fp-1")
    assert same == h
    assert same.paused
    resumed = h.on_credentials_changed("fp-2")
    assert resumed.state is AccountState.OK
    assert not resumed.paused
    assert resumed.credentials_fingerprint == "fp-2"
    assert resumed.credential_refusals == 0
    assert resumed.paused_at is None
    assert resumed.accepting_attempts(T0 + 2)
    # The new credentials get the full two chances again.
    once = resumed.on_credentials_refused(T0 + 3, "535 bad", probe_after=PROBE)
    assert not once.paused


def test_changed_credentials_of_a_healthy_account_only_record_the_fingerprint() -> None:
    h = fresh().on_connection_failure(T0, "refused", 900.0)
    changed = h.on_credentials_changed("fp-2")
    assert changed.credentials_fingerprint == "fp-2"
    assert changed.state is h.state
    assert changed.connection_failures == 1


def test_release() -> None:
    h = fresh()
    for t in (T0, T0 + 1):
        h = h.on_credentials_refused(t, "535 bad", probe_after=PROBE)
    released = h.on_released()
    assert released.state is AccountState.OK
    assert released.credential_refusals == 0
    assert released.paused_at is None
    assert released.accepting_attempts(T0 + 2)


def _paused() -> AccountHealth:
    h = fresh()
    for t in (T0, T0 + 1):
        h = h.on_credentials_refused(t, "535 5.7.8 bad", probe_after=PROBE)
    return h.but_alerted(T0 + 1)


@pytest.mark.parametrize(
    "health",
    [
        AccountHealth("alice@acme.example"),
        fresh().on_credentials_refused(T0, "535 bad", probe_after=PROBE),
        _paused(),
        fresh()
        .on_connection_failure(T0, "a", 60)
        .on_connection_failure(T0 + 1, "b", 60)
        .on_connection_failure(T0 + 2, "c", 60),
        fresh().on_success(T0),
    ],
    ids=["new", "deferred", "paused", "unhealthy", "ok"],
)
def test_health_dict_round_trip(health: AccountHealth) -> None:
    data = json.loads(json.dumps(health.to_dict()))
    assert data["state"] == health.state.value
    assert AccountHealth.from_dict(data) == health


def test_health_from_dict_tolerates_old_and_new_fields() -> None:
    h = AccountHealth.from_dict({"address": "a@b.example", "future_field": 1})
    assert h == AccountHealth("a@b.example")
    assert AccountHealth.from_dict({"address": "a@b.example", "state": "paused"}).paused


# -- the pause survives restarts (relayd/spool/accounts.py) ---------------------------------------


def test_account_store_round_trip_survives_restart(tmp_path: Path) -> None:
    store = AccountStore(tmp_path)
    store.prepare()
    paused = _paused()
    store.save(paused)
    files = list((tmp_path / "accounts").iterdir())
    assert len(files) == 1
    assert files[0].suffix == ".json"  # no temporary file left behind
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "accounts").stat().st_mode) == 0o700
    restarted = AccountStore(tmp_path)
    assert restarted.load("alice@acme.example") == paused
    assert restarted.load("Alice@ACME.example") == paused
    assert restarted.load_all() == {"alice@acme.example": paused}
    # Saving again replaces the record.
    store.save(paused.on_success(T0 + 9000))
    assert not AccountStore(tmp_path).load("alice@acme.example").paused


@pytest.mark.parametrize("garbage", [b"", b"{", b"\x00" * 16, b"[]", b"null", b'{"state": "x"}'])
def test_account_store_unreadable_record_starts_afresh(tmp_path: Path, garbage: bytes) -> None:
    store = AccountStore(tmp_path)
    store.prepare()
    store.save(_paused())
    before = set((tmp_path / "accounts").iterdir())
    store.save(AccountHealth("bob@acme.example", state=AccountState.DEFERRED))
    (bob_path,) = set((tmp_path / "accounts").iterdir()) - before
    bob_path.write_bytes(garbage)
    assert store.load("bob@acme.example") == AccountHealth("bob@acme.example")
    assert store.load_all() == {"alice@acme.example": _paused()}


def test_account_store_load_unknown_account(tmp_path: Path) -> None:
    store = AccountStore(tmp_path)
    assert store.load("New@Acme.Example") == AccountHealth("new@acme.example")
    assert store.load_all() == {}


def test_a_throttled_login_neither_counts_nor_clears_the_refusal_streak() -> None:
    # "454 4.7.0 Too many login attempts" between two refusals: the second still pauses.
    h = AccountHealth("alice@acme.example")
    h = h.on_credentials_refused(100.0, "535 5.7.8 bad", probe_after=3600)
    assert not h.paused and h.credential_refusals == 1
    h = h.on_throttled(101.0, "454 4.7.0 Too many login attempts")
    assert h.credential_refusals == 1 and h.state is AccountState.DEFERRED
    assert "throttled" in h.reason
    h = h.on_credentials_refused(102.0, "535 5.7.8 bad", probe_after=3600)
    assert h.paused


def test_a_pause_made_on_another_fleet_host_holds_without_probe_or_alert() -> None:
    health = AccountHealth(address="a@example.com")
    paused = health.on_paused_elsewhere(100.0, "credentials refused: 535", "host-a")
    assert paused.paused and paused.paused_by == "host-a"
    assert paused.reason == "paused on host-a: credentials refused: 535"
    assert paused.alerted_at == 100.0  # the host that paused it alerted
    assert paused.retry_at == 0.0 and not paused.accepting_attempts(200.0)
    # Already paused here: nothing changes (its own pause, its own probe).
    own = health.on_credentials_refused(1.0, "535", 10.0).on_credentials_refused(2.0, "535", 10.0)
    assert own.on_paused_elsewhere(3.0, "x", "host-b") == own
    # Resumed by the fleet: clear again.
    released = paused.on_released()
    assert released.is_clear and released.paused_by == ""
    assert AccountHealth.from_dict(paused.to_dict()) == paused
