"""The public HTTP side: /in/{input_id}[/tail] takes webhooks; health endpoints."""

from __future__ import annotations
