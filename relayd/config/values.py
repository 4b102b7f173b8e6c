"""The value syntaxes of SPEC "Configuration": addresses, address patterns, hosts, listen
addresses, networks and URLs.

Each parser takes the text (already stripped where SPEC allows that) and returns the value, or
raises ValueError with a short reason (possibly empty) that ends up after
"expected ..., got ...".
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from relayd.config.model import AddressPattern, IPNetwork

__all__ = [
    "ListenAddress",
    "helo_name_problem",
    "is_loopback_host",
    "parse_address",
    "parse_domain_pattern",
    "parse_host",
    "parse_host_port",
    "parse_listen",
    "parse_network",
    "parse_pattern",
    "parse_url",
]

# Characters that never appear in the addresses relayd routes: whitespace and the RFC 5322
# specials that would let an address break out of a header or an SMTP command. "*" is
# reserved for patterns.
_FORBIDDEN = frozenset('<>()[],;:"\\*')
_HOSTNAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*"
)


def _check_chars(text: str) -> None:
    for char in text:
        if char.isspace():
            raise ValueError("spaces are not allowed inside an address")
        if ord(char) < 32 or ord(char) == 127 or char in _FORBIDDEN:
            raise ValueError(f"{char!r} is not allowed in an address")


def _check_domain(domain: str) -> None:
    if not domain:
        raise ValueError("the domain is empty")
    _check_chars(domain)
    if any(not label for label in domain.split(".")):
        raise ValueError("the domain has an empty label")


def parse_address(text: str) -> str:
    """``user@example.com``: exactly one "@", no spaces. Returned as written."""
    if text.count("@") != 1:
        raise ValueError("an address has exactly one @")
    local, domain = text.split("@")
    if not local:
        raise ValueError("the part before @ is empty")
    _check_chars(local)
    _check_domain(domain)
    return text


def parse_pattern(text: str) -> AddressPattern:
    """``user@example.com``, ``*@example.com``, ``*@*.example.com`` or ``*``."""
    lowered = text.lower()
    if lowered == "*":
        return AddressPattern("*")
    if lowered.count("@") != 1:
        raise ValueError('a pattern is user@domain, *@domain, *@*.domain or "*"')
    local, domain = lowered.split("@")
    if local != "*":
        if not local:
            raise ValueError("the part before @ is empty")
        _check_chars(local)
    if domain == "*":
        raise ValueError('to match any address write "*"')
    _check_domain(domain[2:] if domain.startswith("*.") else domain)
    return AddressPattern(lowered)


def parse_domain_pattern(text: str) -> AddressPattern:
    """A ``domains:`` entry: ``example.com`` → ``*@example.com``, ``*.example.com`` →
    ``*@*.example.com``, ``*`` → ``*``."""
    lowered = text.lower()
    if lowered == "*":
        return AddressPattern("*")
    if "@" in lowered:
        raise ValueError("write the domain alone, e.g. example.com")
    _check_domain(lowered[2:] if lowered.startswith("*.") else lowered)
    return AddressPattern("*@" + lowered)


def parse_host(text: str) -> str:
    """A host name or an IP address (IPv6 with or without brackets)."""
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        pass
    if not _HOSTNAME.fullmatch(bare):
        raise ValueError("not a host name or IP address")
    return bare.lower()


def helo_name_problem(name: str) -> str | None:
    """What makes ``name`` a poor EHLO name for mail that leaves the host, or None.

    RFC 5321 §4.1.1.1 asks for the client's fully qualified domain name (or an address
    literal); "localhost" and single-label names are what a host without a configured name
    reports, and receiving servers may refuse them (Postfix's reject_non_fqdn_helo_hostname)
    or count them against the mail."""
    bare = name.lower().rstrip(".")
    if bare == "localhost" or bare.startswith("localhost.") or bare.endswith(".localdomain"):
        return "a loopback name"
    try:
        ipaddress.ip_address(bare)
        return "an IP address, not a name"
    except ValueError:
        pass
    if "." not in bare:
        return "not a fully qualified domain name"
    return None


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: where ``tls: none`` cannot be overheard."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _parse_port(text: str) -> int:
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError("the port must be 1-65535")
    return int(text)


def parse_host_port(text: str) -> tuple[str, int]:
    """``127.0.0.1:2525``, ``[::1]:2525``, ``0.0.0.0:587`` or ``localhost:2525``.

    Only IP addresses and localhost: a daemon binds to addresses, and a name that resolves
    differently tomorrow would silently move the listener.
    """
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError("write [IPv6 address]:port")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ValueError("missing :port")
        if ":" in host:
            raise ValueError(f"write IPv6 addresses in brackets, e.g. [{host}]:{port}")
    if host.lower() == "localhost":
        return "localhost", _parse_port(port)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError("the host must be an IP address or localhost") from None
    return str(address), _parse_port(port)


@dataclass(frozen=True)
class ListenAddress:
    host: str | None
    port: int | None
    unix_path: str | None


def parse_listen(text: str) -> ListenAddress:
    """A listener: ``host:port`` as :func:`parse_host_port`, or ``unix:/path``."""
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise ValueError("the socket path is empty")
        return ListenAddress(None, None, path)
    host, port = parse_host_port(text)
    return ListenAddress(host, port, None)


def parse_network(text: str) -> IPNetwork:
    """``192.168.10.0/24``, ``2001:db8::/32`` or a single address."""
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError("") from None
    raise ValueError(f"host bits are set; did you mean {loose}?")


def parse_url(text: str, *, allow_http: bool = False) -> str:
    """An https URL (``allow_http``: http too). Plain http is always allowed to loopback,
    where a test or a local proxy may answer."""
    parts = urlsplit(text)
    host = parts.hostname or ""
    if parts.scheme not in ("http", "https") or not host:
        raise ValueError("")
    if parts.scheme == "http" and not allow_http and not is_loopback_host(host):
        raise ValueError("use https")
    return text
