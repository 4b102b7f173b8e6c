"""relayd's configuration: the YAML file read once into typed, frozen records.

``load_config`` reports every problem of a file at once, each with its YAML path and line
(SPEC "Configuration"); no other module reads the YAML.
"""

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
    "find_config_path",
    "load_config",
]
