from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from mailworld.world import MailWorld
from tiers import (
    REQUIRE_INTEGRATION_ENV,
    found_prerequisites,
    integration_blocker,
    integration_required,
)

#: Why the integration tests of this session were skipped (unset: they were not).
_skip_reason = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "integration: needs the real mail world (Postfix + Dovecot on loopback)",
    )


@pytest.hookimpl(trylast=True)  # after -m / -k have deselected what will not run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Decide whether the integration tests collected can run here (tests/tiers.py). If not,
    they are skipped with one reason, or the session fails if RELAYD_TESTS_REQUIRE_INTEGRATION
    says they must run."""
    integration = [item for item in items if item.get_closest_marker("integration")]
    if not integration:
        return
    blocker = integration_blocker(os.geteuid(), found_prerequisites())
    if blocker is None:
        return
    if integration_required(os.environ):
        raise pytest.UsageError(
            f"integration tier required ({REQUIRE_INTEGRATION_ENV} is set) but it cannot run "
            f"here: {blocker}"
        )
    config.stash[_skip_reason] = f"integration tier skipped: {blocker}"


@pytest.hookimpl(tryfirst=True)  # before any fixture is set up
def pytest_runtest_setup(item: pytest.Item) -> None:
    reason = item.config.stash.get(_skip_reason, None)
    if reason is not None and item.get_closest_marker("integration"):
        # Raised here, not by a skip marker per test: `-rs` shows the reason once.
        pytest.skip(reason)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    reason = terminalreporter.config.stash.get(_skip_reason, None)
    if reason is not None and "s" not in terminalreporter.reportchars:  # else -rs shows it
        terminalreporter.write_line(reason, yellow=True)


@pytest.fixture(scope="session")
def mail_world() -> Iterator[MailWorld]:
    """One Postfix + Dovecot world for the session (see tests/mailworld/world.py)."""
    blocker = integration_blocker(os.geteuid(), found_prerequisites())
    if blocker is not None:
        pytest.fail(f"the mail world cannot run: {blocker}", pytrace=False)
    world = MailWorld()  # own 0755 dir in /var/tmp
    try:
        world.start()
        yield world
    finally:
        world.stop()  # also removes the directory
