"""The records that travel with a spooled message: its envelope and its delivery state.

Both are plain frozen data with a JSON form. The envelope is written once, inside the
message file, before the 250; the delivery state changes with every attempt and lives beside
it (see ``relayd.spool.store``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

__all__ = ["DeliveryState", "Envelope"]

_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)


@dataclass(frozen=True)
class Envelope:
    queue_id: str
    received_at: float  # epoch seconds
    client: str  # the client name of the config, e.g. "crm" or "anonymous"
    peer: str  # "127.0.0.1:40112", "unix", "maildrop"
    sender: str  # after rewrite_senders
    recipients: tuple[str, ...]
    account: str  # the route: the account address that carries the message
    tenant: str
    is_dsn: bool = False  # relayd's own DSN: never answered by another DSN
    smtputf8: bool = False
    # The message's Message-ID field as received or added (RFC 5322 §3.6.4), found once at
    # reception: the Sent-copy step searches the folder for it before a second APPEND.
    message_id: str | None = None

    def to_json(self) -> bytes:
        # Field by field rather than dataclasses.asdict(), which deep-copies: this runs for
        # every accepted message.
        data = {
            "queue_id": self.queue_id,
            "received_at": self.received_at,
            "client": self.client,
            "peer": self.peer,
            "sender": self.sender,
            "recipients": list(self.recipients),
            "account": self.account,
            "tenant": self.tenant,
            "is_dsn": self.is_dsn,
            "smtputf8": self.smtputf8,
            "message_id": self.message_id,
        }
        return _ENCODER.encode(data).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Envelope:
        data: dict[str, Any] = json.loads(raw)
        data["recipients"] = tuple(data["recipients"])
        return cls(**data)


@dataclass(frozen=True)
class DeliveryState:
    """Where a message's delivery stands; replaced (never edited) after each attempt."""

    attempts: int = 0
    first_attempt_at: float | None = None
    next_attempt_at: float = 0.0
    delivered: tuple[str, ...] = ()
    bounced: tuple[str, ...] = ()
    last_reply: str = ""
    delivered_at: float | None = None
    relay: str = ""
    delay_warned: bool = False  # the one "still trying" DSN (spool.delay_warning) went out
    # Held with `relayd queue hold`: unlike a paused account's hold, only `release` ends it.
    operator_hold: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def pending(self, envelope: Envelope) -> tuple[str, ...]:
        done = set(self.delivered) | set(self.bounced)
        return tuple(r for r in envelope.recipients if r not in done)

    def to_json(self) -> bytes:
        data = asdict(self)
        data["delivered"] = list(self.delivered)
        data["bounced"] = list(self.bounced)
        return json.dumps(data, separators=(",", ":"), ensure_ascii=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> DeliveryState:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise TypeError("delivery state is not a JSON object")
        data["delivered"] = tuple(data.get("delivered", ()))
        data["bounced"] = tuple(data.get("bounced", ()))
        extra = data.get("extra")
        if isinstance(extra, dict) and "operator_hold" in extra:
            # Written by earlier versions into ``extra``.
            extra = dict(extra)
            data["operator_hold"] = bool(extra.pop("operator_hold"))
            data["extra"] = extra
        return cls(**data)

    def but(self, **changes: Any) -> DeliveryState:
        return replace(self, **changes)
