"""A running server keeps what start-up built out of the garbage collector's full scans
(gc.freeze), and hands it back when it stops (gc.unfreeze)."""

from __future__ import annotations

import gc
import pathlib

from relay_server import crypto, settings
from relay_server.store import database
from tests.integration.conftest import serving


async def test_start_up_objects_are_frozen_while_serving_and_released_after(
    database_url: str, tmp_path: pathlib.Path, keyring: crypto.KeyRing
) -> None:
    config = settings.ServerSettings(
        database=database.DatabaseSettings(url=database_url),
        key_file=tmp_path / "unused.key",
        ingress=settings.IngressSettings(listen="127.0.0.1:0"),
        grpc=settings.GrpcSettings(listen="127.0.0.1:0"),
    )
    async with serving(config, keyring):
        assert gc.get_freeze_count() > 0

    assert gc.get_freeze_count() == 0
