"""``web:`` → WebConfig (SPEC "Web"): where the connect and operator pages are served.

Plain HTTP is for loopback only (an SSH tunnel, or a reverse proxy on the same host that
terminates TLS); anything reachable beyond loopback must be HTTPS with a certificate, since
the pages carry app passwords, OAuth answers and admin credentials.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from relayd.config.model import WebConfig
from relayd.config.values import is_loopback_host, parse_host_port, parse_url
from relayd.config.yamlnodes import Item, NodeReader
from relayd.passwords import parse_hash

__all__ = ["WEB_KEYS", "read_web"]

WEB_KEYS = ("address", "public_url", "admins", "certificate", "private_key")


def _public_url(text: str) -> str:
    """An http(s) URL with no query or fragment (paths are joined onto it); http only for a
    loopback host (parse_url)."""
    parse_url(text)
    parts = urlsplit(text)
    if parts.query or parts.fragment:
        raise ValueError("no query or fragment: relayd adds /connect/... to it")
    if parts.username or parts.password:
        raise ValueError("no user or password in it")
    return text.rstrip("/")


def _admin_name(name: str) -> bool:
    # HTTP Basic (RFC 7617 §2): the user-id may not contain a colon.
    return bool(name) and ":" not in name and not any(c.isspace() or ord(c) < 32 for c in name)


def read_web(rd: NodeReader, item: Item) -> WebConfig | None:
    if not item.present:
        return None
    f = rd.mapping(item, WEB_KEYS)
    what = "an address like 127.0.0.1:8425"
    rd.require(f["address"], what)
    found = rd.parsed(f["address"], parse_host_port, what, trim=True)
    public = rd.parsed(f["public_url"], _public_url, "an https URL like https://relay.example")
    certificate = rd.file_path(f["certificate"], "a PEM file path")
    private_key = rd.file_path(f["private_key"], "a PEM file path")
    if f["certificate"].present != f["private_key"].present:
        rd.error(item.path, item.line, "certificate and private_key go together")
    admins: dict[str, str] = {}
    for name, hash_item in rd.mapping(f["admins"], None).items():
        if not _admin_name(name):
            rd.error(hash_item.path, hash_item.line, "an admin name has no spaces or colons")
        encoded = rd.text(hash_item, "a hash from `relayd hash-password`")
        if encoded is None:
            continue
        try:
            parse_hash(encoded)
        except ValueError as exc:
            # Not echoed: a hash is as good as a password against offline guessing.
            rd.error(
                hash_item.path,
                hash_item.line,
                f"not a hash made by `relayd hash-password`: {exc}",
            )
            continue
        admins[name] = encoded
    if found is None:
        return None
    host, port = found
    tls = certificate is not None and private_key is not None
    if not tls and not is_loopback_host(host):
        rd.error(
            f["address"].path,
            f["address"].line,
            f"{host}:{port} is reachable beyond loopback: the web pages carry app passwords "
            "and admin credentials, so serve them with certificate and private_key (HTTPS), "
            "or listen on loopback behind a reverse proxy or an SSH tunnel",
        )
    if public is None:
        shown = f"[{host}]" if ":" in host else host
        public = f"{'https' if tls else 'http'}://{shown}:{port}"
    return WebConfig(
        address=host,
        port=port,
        public_url=public,
        admins=admins,
        certificate=certificate,
        private_key=private_key,
        where=item.where,
    )
