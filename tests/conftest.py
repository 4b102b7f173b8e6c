from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator

    from mailworld.world import MailWorld


def _mailworld_module_name() -> str:
    # "tests.mailworld.world" if tests/ is a package, else pytest has put tests/
    # itself on sys.path; either way the same name the test modules resolve to.
    return f"{__package__}.mailworld.world" if __package__ else "mailworld.world"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "integration: needs the real mail world (Postfix + Dovecot on loopback)",
    )


@pytest.fixture(scope="session")
def mail_world() -> Iterator[MailWorld]:
    """One Postfix + Dovecot world for the session (see tests/mailworld/world.py)."""
    world_module = importlib.import_module(_mailworld_module_name())
    missing: list[str] = world_module.missing_packages()
    if missing:
        pytest.fail(
            "the mail world needs the Debian packages "
            f"{', '.join(missing)}; install them with: "
            f"apt-get install -y {' '.join(missing)}",
            pytrace=False,
        )
    if os.geteuid() != 0:
        pytest.fail(
            "the mail world must run as root (the Postfix master needs it)",
            pytrace=False,
        )
    world: MailWorld = world_module.MailWorld()  # own 0755 dir in /var/tmp
    try:
        world.start()
        yield world
    finally:
        world.stop()  # also removes the directory
