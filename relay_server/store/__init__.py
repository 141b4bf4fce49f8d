"""The storage seam: the rest of the server talks to it in domain terms, never in SQL."""

from __future__ import annotations
