"""Client TLS for relayd's upstreams (SMTP and IMAP): verified, TLS 1.2 or newer.

SPEC "Upstream TLS is never opportunistic": certificates are verified against the system
store or the configured ``ca_file``, host names are checked, and nothing older than TLS 1.2
is spoken (RFC 8996 deprecates TLS 1.0 and 1.1).
"""

from __future__ import annotations

import ssl

__all__ = ["client_context"]


def client_context(ca_file: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
