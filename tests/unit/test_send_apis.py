"""The HTTP send APIs as pure policy: the reply → outcome table, Retry-After, the envelope
kept authoritative over header-addressed APIs, the size limits, and the configuration of
``transport: graph | gmail_api`` (scopes, limits, errors with path and line)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from relayd.config import ConfigError, load_config
from relayd.config.apis import advertised_size, size_limit
from relayd.config.model import Config, SentCopy, TransportKind
from relayd.core.apienvelope import reconcile
from relayd.core.httpapi import (
    Api,
    ApiAnswer,
    ApiError,
    Refreshed,
    map_answer,
    parse_error,
    retry_after_seconds,
)
from relayd.core.outcome import (
    Failure,
    FailureKind,
    Phase,
    Reply,
    Verdict,
    classify_failure,
    classify_reply,
    is_throttle,
)
from relayd.core.sentcopy import Filing, dsn_filing, sent_copy_filing
from relayd.oauth.store import StoredTokens

NOW = 1_800_000_000.0


def answer(
    api: Api,
    status: int,
    code: str = "",
    message: str = "",
    *,
    retry_after: str | None = None,
    refreshed: Refreshed = Refreshed.NOT_YET,
    app_only: bool = False,
) -> Reply | Failure | None:
    return map_answer(
        api,
        ApiAnswer(status, ApiError(code, message), retry_after),
        now=NOW,
        refreshed=refreshed,
        app_only=app_only,
    )


def verdict(outcome: Reply | Failure | None, phase: Phase = Phase.DATA) -> Verdict:
    assert outcome is not None
    if isinstance(outcome, Failure):
        return classify_failure(outcome)
    return classify_reply(phase, outcome)


# -- the table -------------------------------------------------------------------------------


@pytest.mark.parametrize(("api", "status"), [(Api.GRAPH, 202), (Api.GMAIL, 200)])
def test_accepted_is_delivered(api: Api, status: int) -> None:
    outcome = answer(api, status)
    assert isinstance(outcome, Reply) and outcome.code == 250
    assert verdict(outcome) is Verdict.DELIVERED


@pytest.mark.parametrize("api", list(Api))
def test_401_asks_for_one_refresh_then_holds(api: Api) -> None:
    assert answer(api, 401, "InvalidAuthenticationToken") is None
    again = answer(api, 401, "InvalidAuthenticationToken", refreshed=Refreshed.ALREADY)
    assert isinstance(again, Reply) and again.code == 535
    assert verdict(again, Phase.AUTH) is Verdict.HELD


@pytest.mark.parametrize(
    ("api", "code", "app_only", "fix"),
    [
        (Api.GRAPH, "ErrorAccessDenied", True, "application permission Mail.Send"),
        (Api.GRAPH, "ErrorAccessDenied", False, "delegated Graph permission Mail.Send"),
        (Api.GRAPH, "MailboxNotEnabledForRESTAPI", False, "not enabled for the Graph REST API"),
        (Api.GMAIL, "insufficientPermissions", False, "gmail.send"),
        (Api.GMAIL, "insufficientPermissions", True, "domain-wide delegation"),
    ],
)
def test_403_is_a_permission_pause_with_the_admin_step(
    api: Api, code: str, app_only: bool, fix: str
) -> None:
    outcome = answer(api, 403, code, "Access is denied.", app_only=app_only)
    assert isinstance(outcome, Failure) and outcome.kind is FailureKind.PERMISSION
    assert verdict(outcome) is Verdict.HELD
    assert fix in outcome.detail and code in outcome.detail


def test_graph_404_mailbox_not_enabled_is_a_permission_pause() -> None:
    outcome = answer(Api.GRAPH, 404, "MailboxNotEnabledForRESTAPI", "REST API is not yet supported")
    assert isinstance(outcome, Failure) and outcome.kind is FailureKind.PERMISSION


@pytest.mark.parametrize(
    ("api", "code", "message", "enhanced"),
    [
        (Api.GRAPH, "ErrorInvalidRecipients", "Recipient 'x@y' is not resolved.", "5.1.1"),
        (Api.GMAIL, "invalidArgument", "Invalid To header", "5.1.1"),
        (Api.GRAPH, "ErrorMimeContentInvalidBase64String", "Invalid base64 string", "5.6.0"),
        (Api.GMAIL, "failedPrecondition", "Bad Request", "5.6.0"),
    ],
)
def test_400_bounces_with_the_providers_text(
    api: Api, code: str, message: str, enhanced: str
) -> None:
    outcome = answer(api, 400, code, message)
    assert isinstance(outcome, Reply) and outcome.enhanced == enhanced
    assert verdict(outcome) is Verdict.BOUNCED
    assert code in outcome.text and message in outcome.text


def test_413_bounces_as_too_large() -> None:
    outcome = answer(Api.GRAPH, 413, "", "The maximum request length supported is 4MB.")
    assert isinstance(outcome, Reply) and outcome.enhanced == "5.3.4"
    assert verdict(outcome) is Verdict.BOUNCED


@pytest.mark.parametrize("status", [429, 503, 504])
@pytest.mark.parametrize("api", list(Api))
def test_429_503_504_throttle_the_lane_for_retry_after(api: Api, status: int) -> None:
    outcome = answer(api, status, "ApplicationThrottled", retry_after="5")
    assert isinstance(outcome, Reply) and is_throttle(outcome)
    assert outcome.retry_after == 5.0
    assert verdict(outcome) is Verdict.DEFERRED


@pytest.mark.parametrize("reason", ["userRateLimitExceeded", "rateLimitExceeded"])
def test_gmail_rate_limits_in_a_403_throttle_rather_than_pause(reason: str) -> None:
    outcome = answer(Api.GMAIL, 403, reason, "User-rate limit exceeded")
    assert isinstance(outcome, Reply) and is_throttle(outcome)


@pytest.mark.parametrize("status", [500, 502])
def test_other_5xx_defer_without_throttling(status: int) -> None:
    outcome = answer(Api.GRAPH, status, "InternalServerError")
    assert isinstance(outcome, Reply) and not is_throttle(outcome)
    assert verdict(outcome) is Verdict.DEFERRED


def test_other_4xx_bounce() -> None:
    assert verdict(answer(Api.GRAPH, 409, "Conflict")) is Verdict.BOUNCED


def test_retry_after_seconds_and_http_date() -> None:
    assert retry_after_seconds("5", NOW) == 5.0
    assert retry_after_seconds(" 120 ", NOW) == 120.0
    # RFC 9110 §5.6.7 IMF-fixdate, 30 s after NOW.
    assert retry_after_seconds("Fri, 15 Jan 2027 08:00:30 GMT", 1_800_000_000.0) == 30.0
    assert retry_after_seconds("Fri, 15 Jan 2027 07:00:00 GMT", NOW) == 0.0
    assert retry_after_seconds(None, NOW) is None
    assert retry_after_seconds("soon", NOW) is None


def test_error_bodies_of_both_apis_are_read() -> None:
    graph = parse_error(b'{"error": {"code": "ErrorAccessDenied", "message": "Access is denied."}}')
    assert graph == ApiError("ErrorAccessDenied", "Access is denied.")
    google = parse_error(
        b'{"error": {"code": 403, "message": "Insufficient Permission", "errors": '
        b'[{"reason": "insufficientPermissions"}], "status": "PERMISSION_DENIED"}}'
    )
    assert google == ApiError("insufficientPermissions", "Insufficient Permission")
    assert parse_error(b"<html>bad gateway</html>").message == "<html>bad gateway</html>"
    assert str(ApiError("X", "a\r\nb" + "c" * 1000)).startswith("X: a b")
    assert len(str(ApiError("X", "c" * 1000))) <= 400


# -- the envelope -----------------------------------------------------------------------------

HEAD = (
    b"From: Alice <alice@example.test>\r\nTo: Bob <bob@example.test>\r\n"
    b"Cc: carol@example.test,\r\n dave@example.test\r\nSubject: hi\r\n\r\nbody\r\n"
)


def test_headers_matching_the_envelope_go_byte_for_byte() -> None:
    env = ("bob@example.test", "carol@example.test", "DAVE@example.test")
    result = reconcile(HEAD, env)
    assert result.unchanged and result.content is HEAD


def test_envelope_only_recipients_are_added_as_bcc_at_the_top() -> None:
    env = ("bob@example.test", "carol@example.test", "dave@example.test", "eve@example.test")
    result = reconcile(HEAD, env)
    assert result.added_bcc == ("eve@example.test",) and result.removed == ()
    assert result.content == b"Bcc: eve@example.test\r\n" + HEAD


def test_header_recipients_outside_the_envelope_are_left_out() -> None:
    result = reconcile(HEAD, ("bob@example.test", "dave@example.test"))
    assert result.removed == ("carol@example.test",)
    assert b"Cc: dave@example.test\r\n" in result.content
    assert b"carol" not in result.content
    assert result.content.startswith(b"From: Alice <alice@example.test>\r\nTo: Bob <bob@")


def test_a_field_left_empty_becomes_the_empty_group_and_bcc_goes() -> None:
    mime = b"From: a@example.test\r\nTo: x@example.test\r\nBcc: y@example.test\r\n\r\nb\r\n"
    result = reconcile(mime, ("z@example.test",))
    assert result.content == (
        b"Bcc: z@example.test\r\nFrom: a@example.test\r\nTo: undisclosed-recipients:;\r\n\r\nb\r\n"
    )
    assert result.removed == ("x@example.test", "y@example.test")


def test_the_body_is_never_read_as_headers() -> None:
    mime = b"From: a@example.test\r\nTo: x@example.test\r\n\r\nTo: y@example.test\r\n"
    result = reconcile(mime, ("x@example.test",))
    assert result.unchanged


# -- configuration ----------------------------------------------------------------------------


def load(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "relayd.yaml"
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return load_config(path)


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return info.value.problems


GRAPH = """
tenants:
  acme:
    provider: microsoft365
    transport: graph
    domains: [acme.example]
    oauth:
      client_id: c
      tenant_id: acme.example
      flow: client_credentials
      client_secret: {env: PW}
    accounts:
      - address: alice@acme.example
        oauth: {flow: delegated}
  g:
    provider: google-workspace
    transport: gmail_api
    gmail_url: https://gmail.test.example/
    oauth: {flow: delegated, client_id: g, client_secret: {env: PW}}
    accounts:
      - address: carol@g.example
      - address: dave@g.example
        transport: smtp
"""


@pytest.fixture
def pw(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PW", "secret-value")


def test_transports_scopes_and_urls(tmp_path: Path, pw: None) -> None:
    config = load(tmp_path, GRAPH)
    acme, g = config.tenants
    [alice] = acme.accounts
    app = acme.domain_account
    assert app is not None and app.oauth is not None and alice.oauth is not None
    assert alice.transport is TransportKind.GRAPH and app.transport is TransportKind.GRAPH
    assert alice.api_url == "https://graph.microsoft.com"
    assert alice.oauth.scopes == ("https://graph.microsoft.com/Mail.Send",)
    assert app.oauth.scopes == ("https://graph.microsoft.com/.default",)
    # Graph's own limits, not those of Microsoft's SMTP (3 sessions, 30 a minute).
    assert (alice.limits.max_connections, alice.limits.max_messages_per_minute) == (4, 0)
    carol, dave = g.accounts
    assert carol.transport is TransportKind.GMAIL_API
    assert carol.api_url == "https://gmail.test.example"
    assert carol.oauth is not None
    assert carol.oauth.scopes == ("https://www.googleapis.com/auth/gmail.send",)
    assert dave.transport is TransportKind.SMTP and dave.oauth is not None
    assert dave.oauth.scopes == ()
    # Sent copies: the APIs file their own; DSNs go through the API, not IMAP.
    assert carol.sent_copy is SentCopy.AUTO
    for account in (alice, app, carol):
        assert sent_copy_filing(account) is Filing.NONE
        assert dsn_filing(account) is Filing.NONE
    assert dsn_filing(dave) is Filing.IMAP


def test_transport_errors_name_path_and_line(tmp_path: Path, pw: None) -> None:
    assert problems(
        tmp_path,
        """
        tenants:
          t:
            provider: gmail
            transport: graph
            accounts:
              - address: a@example.com
                password: {env: PW}
          u:
            provider: microsoft365
            transport: graph
            accounts:
              - address: b@example.com
                password: {env: PW}
          v:
            provider: microsoft365
            transport: grpah
            accounts:
              - address: c@example.com
                password: {env: PW}
          w:
            provider: microsoft365
            transport: graph
            limits: {max_connections: 8}
            graph_url: ftp://x
            oauth: {flow: delegated, client_id: c, tenant_id: t}
            accounts:
              - address: d@example.com
        """,
    ) == [
        "tenants.t.transport: line 4: transport graph (Microsoft Graph sendMail) is for "
        "provider microsoft365 or outlook, not gmail",
        "tenants.u.accounts[0]: line 12: transport graph needs OAuth: Microsoft Graph sendMail "
        "takes no passwords; set oauth (on the account or its tenant)",
        'tenants.v.transport: line 16: expected one of smtp, graph, gmail_api, got "grpah"',
        "tenants.w.limits.max_connections: line 23: Microsoft Graph allows at most 4 concurrent "
        "requests per mailbox; max_connections 8 would only earn 429 replies",
        'tenants.w.graph_url: line 24: expected an https URL, got "ftp://x"',
    ]


def test_capture_takes_no_transport(tmp_path: Path) -> None:
    [problem] = problems(
        tmp_path,
        """
        tenants:
          s:
            provider: capture
            transport: graph
            domains: ["*"]
        """,
    )
    assert problem.startswith("tenants.s.transport: line 4: provider capture delivers")


def test_size_limits_per_route(tmp_path: Path, pw: None) -> None:
    config = load(tmp_path, GRAPH)
    alice = config.tenants[0].accounts[0]
    limit, reply = size_limit(alice, 35 * 2**20)
    assert limit == 3 * 2**20
    assert reply is not None and reply.startswith("552 5.3.4 ")
    assert "Microsoft Graph sendMail" in reply and "3145728" in reply
    carol, dave = config.tenants[1].accounts
    assert size_limit(carol, 35 * 2**20) == (35 * 2**20, None)
    assert size_limit(dave, 10**6) == (10**6, None)
    # Before MAIL FROM the route is unknown: EHLO offers the largest of the routes.
    assert advertised_size(config) == 35 * 2**20


def test_stored_consent_for_other_scopes_is_noticed() -> None:
    old = StoredTokens("a@x", "delegated", scopes=None)
    smtp = StoredTokens("a@x", "delegated", scopes=[])
    graph = StoredTokens("a@x", "delegated", scopes=["https://graph.microsoft.com/Mail.Send"])
    wanted = ("https://graph.microsoft.com/Mail.Send",)
    assert not old.consented_to_other_scopes(wanted)  # unknown: let the provider say
    assert smtp.consented_to_other_scopes(wanted)
    assert not graph.consented_to_other_scopes(wanted)
    assert graph.consented_to_other_scopes(())


def test_smtp_auth_disabled_hint_points_at_graph() -> None:
    from relayd.core.hints import hint_for

    hint = hint_for("535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled")
    assert hint is not None and "transport: graph" in hint
