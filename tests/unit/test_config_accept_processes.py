"""``accept_processes``: how many processes accept SMTP beside the main one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from relayd.config import ConfigError, load_config
from relayd.config.model import Config
from relayd.inbound.processes import accept_process_count


def load(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "relayd.yaml"
    path.write_text(text)
    return load_config(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", None),
        ("accept_processes: auto\n", None),
        ("accept_processes: 0\n", 0),
        ("accept_processes: 3\n", 3),
    ],
)
def test_values(tmp_path: Path, text: str, expected: int | None) -> None:
    assert load(tmp_path, "log_level: info\n" + text).accept_processes == expected


@pytest.mark.parametrize("value", ["-1", "65", "two", "1.5", '"3 "', "[]"])
def test_wrong_values_name_their_line(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, f"log_level: info\naccept_processes: {value}\n")
    assert any(
        p.startswith("accept_processes: line 2: expected auto or an integer 0-64")
        for p in raised.value.problems
    ), raised.value.problems


def test_auto_is_one_per_cpu_the_process_may_use_plus_one(tmp_path: Path) -> None:
    config = load(tmp_path, "log_level: info\n")
    assert accept_process_count(config) == len(os.sched_getaffinity(0)) + 1
    assert accept_process_count(load(tmp_path, "accept_processes: 0\n")) == 0
