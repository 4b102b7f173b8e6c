"""The two test tiers and whether this machine can run the second one.

The unit tier runs anywhere. The integration tier needs what ./scripts/test prepares: root
(the Postfix master needs it) and the Debian packages of the mail world (Postfix, Dovecot) and
of the commands the integration tests run (swaks, systemd-analyze). Where it cannot run, plain
``pytest`` skips it; with ``RELAYD_TESTS_REQUIRE_INTEGRATION=1`` (set by ./scripts/test) that
is a failure instead.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Collection, Mapping
from pathlib import Path

from mailworld.world import REQUIRED_FILES

#: Set (to anything but "" or "0") to fail, not skip, when the integration tier cannot run.
REQUIRE_INTEGRATION_ENV = "RELAYD_TESTS_REQUIRE_INTEGRATION"

#: Commands the integration tests run besides the mail world's daemons, and their package.
REQUIRED_COMMANDS: dict[str, str] = {"swaks": "swaks", "systemd-analyze": "systemd"}

#: Everything the integration tier needs (absolute paths of files, names of commands on
#: PATH), each with the Debian package that provides it.
PREREQUISITES: dict[str, str] = {
    **{str(path): package for path, package in REQUIRED_FILES.items()},
    **REQUIRED_COMMANDS,
}


def found_prerequisites() -> set[str]:
    """The entries of PREREQUISITES present on this machine."""
    return {
        name
        for name in PREREQUISITES
        if (Path(name).exists() if os.path.isabs(name) else shutil.which(name) is not None)
    }


def integration_blocker(euid: int, found: Collection[str]) -> str | None:
    """Why the integration tier cannot run, or None if it can.

    ``euid`` is the test process's effective user id, ``found`` the entries of PREREQUISITES
    present (see found_prerequisites).
    """
    needs: list[str] = []
    if euid != 0:
        needs.append(f"root (running as uid {euid})")
    missing = list(dict.fromkeys(p for name, p in PREREQUISITES.items() if name not in found))
    if missing:
        needs.append("the Debian packages " + ", ".join(missing))
    if not needs:
        return None
    return (
        f"needs {' and '.join(needs)}; ./scripts/test, run as root, installs the packages and "
        "runs everything"
    )


def integration_required(environ: Mapping[str, str]) -> bool:
    """Whether the environment asks for a failure rather than a skip (see ./scripts/test)."""
    return environ.get(REQUIRE_INTEGRATION_ENV, "") not in ("", "0")
