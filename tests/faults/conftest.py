"""Fault tests run real processes: the acceptance fixtures, reused as they are."""

from __future__ import annotations

from tests.acceptance.conftest import agents, relay, running, template

__all__ = ["agents", "relay", "running", "template"]
