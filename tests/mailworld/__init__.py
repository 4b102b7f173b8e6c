"""A real mail world (Postfix + Dovecot on loopback) for relayd's integration tests."""

from .pki import Pki, create_pki
from .world import DOMAIN, REJECTED_DOMAIN, MailWorld, make_base_dir, missing_packages

__all__ = [
    "DOMAIN",
    "REJECTED_DOMAIN",
    "MailWorld",
    "Pki",
    "create_pki",
    "make_base_dir",
    "missing_packages",
]
