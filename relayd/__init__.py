"""relayd: a local SMTP relay that sends through each account's own mailbox provider."""

__version__ = "0.1.0"
