"""Reading a composed YAML tree while knowing where every value was written.

``yaml.compose`` keeps each node's position, so every accessor here can report a problem as
``path: line N: message`` (SPEC "Configuration"). Problems are collected rather than raised, so
that one run of ``check-config`` shows all of them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TypeVar

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

__all__ = [
    "ConfigError",
    "Fields",
    "Item",
    "NodeReader",
    "compose",
    "parse_duration",
    "parse_size",
]

T = TypeVar("T")
E = TypeVar("E", bound=Enum)

_NULL_TAG = "tag:yaml.org,2002:null"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")
_DIGITS = re.compile(r"[0-9]+")


class ConfigError(Exception):
    """The configuration cannot be used. ``problems`` holds one line per problem;
    ``warnings`` what else was found on the way, so that check-config can show it too."""

    def __init__(self, problems: Sequence[str], warnings: Sequence[str] = ()) -> None:
        self.problems = list(problems)
        self.warnings = list(warnings)
        super().__init__("\n".join(self.problems))

    def __str__(self) -> str:
        return "\n".join(self.problems)


def line_of(node: Node) -> int:
    return int(node.start_mark.line) + 1


def key_path(parent: str, key: str) -> str:
    # Keys such as "*@localhost" are quoted so the path stays readable and unambiguous.
    text = key if _PLAIN_KEY.fullmatch(key) else json.dumps(key, ensure_ascii=False)
    return f"{parent}.{text}" if parent else text


def describe(node: Node) -> str:
    """What the person wrote, for "expected X, got Y" (quoted, so stray spaces show)."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    if node.tag == _NULL_TAG:
        return "nothing"
    return json.dumps(str(node.value), ensure_ascii=False)


def is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == _NULL_TAG


def compose(text: str, name: str) -> Node | None:
    """Parse ``text`` into a node tree (safe loader: no Python objects, no tags beyond YAML's)."""
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{name}: line {mark.line + 1}" if mark is not None else name
        what = ", ".join(str(p) for p in (exc.context, exc.problem) if p)
        raise ConfigError([f"{where}: {what or 'not valid YAML'}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{name}: not valid YAML: {exc}"]) from None


_SIZE = re.compile(r"([0-9]+) ?([A-Za-z]*)")
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}
_DURATION_PART = re.compile(r"([0-9]+)([smhd])")
_DURATION = re.compile(r"(?:[0-9]+[smhd])+")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_size(text: str) -> int:
    """``35MiB`` (binary units), ``10MB`` (decimal units) or a plain number of bytes."""
    match = _SIZE.fullmatch(text)
    if match is None or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError("")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def parse_duration(text: str) -> float:
    """``30s``, ``5m``, ``1h``, ``5d`` (or combined, ``1h30m``); a plain number is seconds."""
    if _DIGITS.fullmatch(text):
        return float(text)
    if not _DURATION.fullmatch(text):
        raise ValueError("")
    return float(sum(int(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(text)))


@dataclass(frozen=True)
class Item:
    """One value of the tree with its path; ``node`` is None when the key is absent.

    ``line`` is where the key (or list item) was written, or for an absent key the line of the
    mapping that lacks it.
    """

    path: str
    node: Node | None
    line: int

    @property
    def present(self) -> bool:
        return self.node is not None

    @property
    def where(self) -> str:
        return f"{self.path}: line {self.line}"


class Fields:
    """The entries of one YAML mapping, addressed by key."""

    def __init__(self, path: str, line: int, entries: dict[str, Item]) -> None:
        self.path = path
        self.line = line
        self._entries = entries

    def __getitem__(self, key: str) -> Item:
        found = self._entries.get(key)
        return found if found is not None else Item(key_path(self.path, key), None, self.line)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def items(self) -> list[tuple[str, Item]]:
        return list(self._entries.items())

    @property
    def where(self) -> str:
        return f"{self.path}: line {self.line}"


class NodeReader:
    """Typed accessors over YAML nodes; each records a problem and returns None on bad input."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir  # relative paths in the file are relative to its directory
        self.problems: list[str] = []
        self.warnings: list[str] = []

    # -- reporting ---------------------------------------------------------------------------

    def error(self, path: str, line: int, message: str) -> None:
        self.problems.append(f"{path}: line {line}: {message}")

    def warn(self, path: str, line: int, message: str) -> None:
        self.warnings.append(f"{path}: line {line}: {message}")

    def expected(self, item: Item, what: str, reason: str = "") -> None:
        got = describe(item.node) if item.node is not None else "nothing"
        self.error(
            item.path, item.line, f"expected {what}, got {got}" + (f": {reason}" if reason else "")
        )

    def require(self, item: Item, what: str) -> bool:
        """True if present; else reports the missing key."""
        if item.node is None:
            self.error(item.path, item.line, f"missing; expected {what}")
            return False
        return True

    # -- collections -------------------------------------------------------------------------

    def mapping(self, item: Item, allowed: Sequence[str] | None) -> Fields:
        """The mapping at ``item`` (empty if absent, null or not a mapping).

        Unknown keys (when ``allowed`` is given) and duplicate keys are reported. YAML merge
        keys (``<<: *defaults``) are honoured, explicit keys winning.
        """
        node = item.node
        if node is None or is_null(node):
            return Fields(item.path, item.line, {})
        if not isinstance(node, MappingNode):
            self.expected(item, "a mapping")
            return Fields(item.path, item.line, {})
        entries: dict[str, Item] = {}
        self._collect(item.path, node, entries, allowed, explicit=True)
        return Fields(item.path, item.line, entries)

    def record(self, item: Item, allowed: Sequence[str]) -> Fields | None:
        """A mapping that must be one (a listener, a tenant, an account): None, reported, if
        it is anything else, so that its keys are not reported missing on top."""
        if not isinstance(item.node, MappingNode):
            self.expected(item, "a mapping")
            return None
        return self.mapping(item, allowed)

    def _collect(
        self,
        path: str,
        node: MappingNode,
        entries: dict[str, Item],
        allowed: Sequence[str] | None,
        *,
        explicit: bool,
    ) -> None:
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                sources = value_node.value if isinstance(value_node, SequenceNode) else [value_node]
                for source in sources:
                    if isinstance(source, MappingNode):
                        merged: dict[str, Item] = {}
                        self._collect(path, source, merged, allowed, explicit=False)
                        for key, value in merged.items():
                            entries.setdefault(key, value)
                continue
            line = line_of(key_node)
            if not isinstance(key_node, ScalarNode) or is_null(key_node):
                self.error(path, line, f"keys must be plain strings, got {describe(key_node)}")
                continue
            key = str(key_node.value)
            child = Item(key_path(path, key), value_node, line)
            if key in seen:
                self.error(child.path, line, f"duplicate key (first written on line {seen[key]})")
                continue
            seen[key] = line
            if allowed is not None and key not in allowed:
                if explicit:
                    self.error(child.path, line, f"unknown key; allowed keys: {', '.join(allowed)}")
                continue
            if explicit:
                entries[key] = child  # explicit keys override merged ones
            else:
                entries.setdefault(key, child)

    def sequence(self, item: Item) -> list[Item]:
        """The list at ``item`` (empty if absent or null; a scalar is reported, not wrapped)."""
        node = item.node
        if node is None or is_null(node):
            return []
        if not isinstance(node, SequenceNode):
            hint = f"write [{node.value}]" if isinstance(node, ScalarNode) else ""
            self.expected(item, "a list", hint)
            return []
        return [Item(f"{item.path}[{i}]", n, line_of(n)) for i, n in enumerate(node.value)]

    # -- scalars -----------------------------------------------------------------------------

    def text(self, item: Item, what: str = "a string", *, trim: bool = False) -> str | None:
        """A scalar's text as written. ``trim``: surrounding whitespace is warned about, then
        removed (hosts, usernames, addresses: SPEC "Configuration")."""
        node = item.node
        if node is None:
            return None
        if not isinstance(node, ScalarNode) or is_null(node):
            self.expected(item, what)
            return None
        value = str(node.value)
        if trim and value != value.strip():
            self.warn(
                item.path, item.line, f"leading/trailing whitespace removed from {describe(node)}"
            )
            value = value.strip()
        if not value:
            self.expected(item, what)
            return None
        return value

    def parsed(
        self, item: Item, parse: Callable[[str], T], what: str, *, trim: bool = False
    ) -> T | None:
        """``parse(text)``; a ValueError from it becomes "expected WHAT, got ...: reason"."""
        value = self.text(item, what, trim=trim)
        if value is None:
            return None
        try:
            return parse(value)
        except ValueError as exc:
            self.expected(item, what, str(exc))
            return None

    def integer(self, item: Item, low: int, high: int | None = None) -> int | None:
        what = f"an integer {low}-{high}" if high is not None else f"an integer of {low} or more"

        def parse(text: str) -> int:
            # Decimal digits only: YAML 1.1 would also read 0x1F, 0o17 or 1:30 as integers.
            if not _DIGITS.fullmatch(text):
                raise ValueError("")
            value = int(text)
            if value < low or (high is not None and value > high):
                raise ValueError("")
            return value

        return self._strict(item, parse, what)

    def boolean(self, item: Item) -> bool | None:
        def parse(text: str) -> bool:
            lowered = text.lower()
            if lowered in ("true", "yes", "on"):
                return True
            if lowered in ("false", "no", "off"):
                return False
            raise ValueError("")

        return self._strict(item, parse, "true or false")

    def choice(self, item: Item, choices: Sequence[str]) -> str | None:
        def parse(text: str) -> str:
            if text.lower() not in choices:
                raise ValueError("")
            return text.lower()

        return self._strict(item, parse, "one of " + ", ".join(choices))

    def enum(self, item: Item, cls: type[E]) -> E | None:
        value = self.choice(item, [str(member.value) for member in cls])
        return cls(value) if value is not None else None

    def size(self, item: Item) -> int | None:
        return self._strict(item, parse_size, "a size like 35MiB, 10MB or a number of bytes")

    def duration(self, item: Item, *, allow_zero: bool = False) -> float | None:
        def parse(text: str) -> float:
            seconds = parse_duration(text)
            if seconds == 0 and not allow_zero:
                raise ValueError("must be more than 0")
            return seconds

        what = "a duration like 30s, 5m, 1h or 5d" + (" (0 = off)" if allow_zero else "")
        return self._strict(item, parse, what)

    def file_path(self, item: Item, what: str = "a path") -> Path | None:
        value = self.text(item, what)
        return self.base_dir / value if value is not None else None

    def _strict(self, item: Item, parse: Callable[[str], T], what: str) -> T | None:
        # No trimming: "5870 " is reported as written rather than guessed at.
        return self.parsed(item, parse, what)
