"""Agent streams: the AgentRelay servicer, one session per stream, and the wake-up hub."""

from __future__ import annotations
