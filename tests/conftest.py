from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never inherit a developer's STOWHOOK_* settings."""
    for name in list(os.environ):
        if name.startswith("STOWHOOK_"):
            monkeypatch.delenv(name)
