"""relayd's configuration: the YAML file read once into typed, frozen records.

``load_config`` reports every problem of a file at once, each with its YAML path and line
(SPEC "Configuration"); no other module reads the YAML.
"""

import sys

from relayd.config.loader import find_config_path, load_config
from relayd.config.model import (
    ANONYMOUS,
    AccountConfig,
    AddressPattern,
    AlertsConfig,
    AuthPolicy,
    ClientConfig,
    Config,
    ImapServer,
    Limits,
    ListenerConfig,
    MetricsConfig,
    OAuthConfig,
    RetryPolicy,
    Secret,
    SentCopy,
    SmtpServer,
    SpoolConfig,
    TenantConfig,
    TlsMode,
    WebConfig,
)
from relayd.config.yamlnodes import ConfigError

__all__ = [
    "ANONYMOUS",
    "AccountConfig",
    "AddressPattern",
    "AlertsConfig",
    "AuthPolicy",
    "ClientConfig",
    "Config",
    "ConfigError",
    "ImapServer",
    "Limits",
    "ListenerConfig",
    "MetricsConfig",
    "OAuthConfig",
    "RetryPolicy",
    "Secret",
    "SentCopy",
    "SmtpServer",
    "SpoolConfig",
    "TenantConfig",
    "TlsMode",
    "WebConfig",
    "find_config_path",
    "load_config",
    "load_for_command",
]


def load_for_command(cli_path: object) -> Config | None:
    """The config for a CLI command (``-c``, ``$RELAYD_CONFIG`` or the default path), or None
    after printing every problem as ``error: PATH: line N: ...`` on stderr."""
    try:
        return load_config(find_config_path(cli_path if isinstance(cli_path, str) else None))
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return None
