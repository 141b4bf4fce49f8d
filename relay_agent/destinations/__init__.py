"""Where the agent hands events: one module per kind of destination."""

from __future__ import annotations
