"""Every error the agent raises on purpose.

    AgentError                  root: catch this to catch anything the agent means to raise
    ├── FatalError              retrying cannot fix it: run() raises it, the CLI exits non-zero
    │   ├── TokenRefused        the server said UNAUTHENTICATED (bad, unknown or revoked token)
    │   ├── BucketRefused       the server said PERMISSION_DENIED (bucket unknown or out of scope)
    │   └── ConfigError         the settings are wrong (raised before anything connects)
    ├── ConnectionLost          the stream broke or ended: the agent reconnects with backoff
    └── SettlementError         an event could not be settled (SDK: ack, nack, reject, extend)
        ├── LeaseLost           the lease is no longer held: the server delivers the event again
        └── AlreadySettled      the event was settled before: each event is settled once

The default message of each class is the first line of its docstring; extra data travels
as attributes, never inside strings that someone would have to parse.
"""

from __future__ import annotations


class AgentError(Exception):
    """The relay agent failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or _first_line(type(self).__doc__))


class FatalError(AgentError):
    """The agent cannot go on: retrying would not help."""


class TokenRefused(FatalError):
    """The server refused the agent token."""

    def __init__(self, message: str | None = None, *, key_id: str | None = None) -> None:
        super().__init__(message)
        self.key_id = key_id


class BucketRefused(FatalError):
    """The server refused a subscribed bucket (unknown or not in the token's scope)."""

    def __init__(self, message: str | None = None, *, bucket: str | None = None) -> None:
        super().__init__(message)
        self.bucket = bucket


class ConfigError(FatalError):
    """The agent's configuration is invalid."""


class ConnectionLost(AgentError):
    """The connection to the server was lost."""


class SettlementError(AgentError):
    """The event could not be settled."""

    def __init__(self, message: str | None = None, *, lease_id: str | None = None) -> None:
        super().__init__(message)
        self.lease_id = lease_id


class LeaseLost(SettlementError):
    """The lease is no longer held: the server will deliver the event again."""


class AlreadySettled(SettlementError):
    """The event has already been settled (acked, nacked or rejected)."""


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0] if doc else ""
