"""The decision to run, skip or fail the integration tier (tests/tiers.py)."""

from __future__ import annotations

import pytest
from tiers import PREREQUISITES, REQUIRE_INTEGRATION_ENV, integration_blocker, integration_required

EVERYTHING = set(PREREQUISITES)


def test_root_with_every_prerequisite_runs_the_integration_tier() -> None:
    assert integration_blocker(0, EVERYTHING) is None


def test_not_root_is_named_with_the_uid() -> None:
    blocker = integration_blocker(1000, EVERYTHING)
    assert blocker is not None
    assert blocker.startswith("needs root (running as uid 1000);")
    assert "Debian packages" not in blocker
    assert "./scripts/test, run as root, installs the packages and runs everything" in blocker


def test_missing_files_and_commands_are_named_by_their_package_once() -> None:
    found = EVERYTHING - {"/usr/lib/dovecot/imap", "swaks", "systemd-analyze"}
    assert integration_blocker(0, found) == (
        "needs the Debian packages dovecot-imapd, swaks, systemd; ./scripts/test, run as root, "
        "installs the packages and runs everything"
    )


def test_nothing_found_and_not_root() -> None:
    blocker = integration_blocker(65534, set())
    assert blocker is not None
    assert blocker.startswith(
        "needs root (running as uid 65534) and the Debian packages postfix, dovecot-core, "
        "dovecot-imapd, dovecot-lmtpd, swaks, systemd;"
    )


def test_every_debian_package_scripts_test_installs_is_a_prerequisite() -> None:
    assert sorted(set(PREREQUISITES.values())) == [
        "dovecot-core",
        "dovecot-imapd",
        "dovecot-lmtpd",
        "postfix",
        "swaks",
        "systemd",
    ]


@pytest.mark.parametrize(
    ("environ", "required"),
    [
        ({}, False),
        ({REQUIRE_INTEGRATION_ENV: ""}, False),
        ({REQUIRE_INTEGRATION_ENV: "0"}, False),
        ({REQUIRE_INTEGRATION_ENV: "1"}, True),
        ({"OTHER": "1"}, False),
    ],
)
def test_the_environment_turns_the_skip_into_a_failure(
    environ: dict[str, str], required: bool
) -> None:
    assert integration_required(environ) is required
