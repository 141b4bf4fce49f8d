"""The seam between the agent and whatever receives its events."""

from __future__ import annotations

from typing import Protocol

from relay_agent import models


class Destination(Protocol):
    """Hands one delivery to its receiver and says how it went.

    deliver() reports failures as Nack or Reject outcomes; it raises only on bugs.
    It may be cancelled at any time (lease lost, shutdown), and must then stop quickly.
    """

    async def deliver(self, delivery: models.Delivery) -> models.Outcome: ...

    async def close(self) -> None: ...
