"""Stowhook relay agent: receives stored webhooks from a Stowhook server over one
outbound gRPC stream and hands them to an internal destination.

The Python SDK, for workers that handle events in their own code (docs/sdk.md):

    async with relay_agent.Consumer(relay_agent.AgentSettings(...)) as consumer:
        async for event in consumer:
            ...
            await event.ack()
"""

from __future__ import annotations

__version__ = "0.1.0"

from relay_agent.consumer import Consumer, Event
from relay_agent.errors import (
    AgentError,
    AlreadySettled,
    BucketRefused,
    ConfigError,
    ConnectionLost,
    FatalError,
    LeaseLost,
    SettlementError,
    TokenRefused,
)
from relay_agent.settings import AgentSettings, ReconnectPolicy

__all__ = [
    "AgentError",
    "AgentSettings",
    "AlreadySettled",
    "BucketRefused",
    "ConfigError",
    "ConnectionLost",
    "Consumer",
    "Event",
    "FatalError",
    "LeaseLost",
    "ReconnectPolicy",
    "SettlementError",
    "TokenRefused",
    "__version__",
]
