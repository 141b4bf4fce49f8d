"""Fault 6, disk full: the database's filesystem runs out of space under ingest.

The relay's var/ lives on a 4 MiB tmpfs and a filler file takes all but a few hundred
KiB of it. Webhooks then fill the rest: from that moment each must be answered 503 with
Retry-After (nothing stored), never 200. When the filler is deleted the server must
answer 200 again by itself, and an agent must deliver exactly the events answered 200.
Mounting needs root (CAP_SYS_ADMIN); elsewhere the test is skipped and says why.
"""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import ClientSession

from tests.acceptance import harness

BODY_BYTES = 16 * 1024
HEADROOM = 384 * 1024  # free space left beside the filler
MAX_POSTS = 400  # 6 MiB of bodies: far more than the headroom


@contextlib.contextmanager
def small_filesystem(where: pathlib.Path, size: str = "4m") -> Iterator[pathlib.Path]:
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(folder: pathlib.Path, leave: int) -> pathlib.Path:
    stats = os.statvfs(folder)
    filler = folder / "filler"
    with open(filler, "wb") as out:
        out.write(b"\0" * max(0, stats.f_bavail * stats.f_frsize - leave))
    return filler


async def post(session: ClientSession, url: str, n: int) -> tuple[int, str | None, bytes]:
    body = n.to_bytes(4, "big") + os.urandom(BODY_BYTES - 4)  # incompressible
    async with session.post(url, data=body) as resp:
        await resp.read()
        return resp.status, resp.headers.get("Retry-After"), body


async def test_a_full_disk_gets_503s_and_recovers_when_space_returns(
    relay: harness.Relay, agents: Any, tmp_path: pathlib.Path
) -> None:
    with small_filesystem(tmp_path / "tiny") as tiny:
        for item in (relay.home / "var").iterdir():
            shutil.copy2(item, tiny / item.name)
        shutil.rmtree(relay.home / "var")
        (relay.home / "var").symlink_to(tiny)  # logs stay on the roomy disk
        relay.start()
        await relay.wait_ready()
        filler = fill(tiny, HEADROOM)
        answers: list[tuple[int, str | None, bytes]] = []
        async with ClientSession() as session:
            for n in range(MAX_POSTS):
                answers.append(await post(session, relay.input_url(), n))
                if [status for status, _, _ in answers[-5:]] == [503] * 5:
                    break
            statuses = {status for status, _, _ in answers}
            assert statuses <= {200, 503}, f"answers other than 200/503: {statuses}"
            assert answers[-1][0] == 503, "the disk never filled: the test proved nothing"
            assert all(retry for status, retry, _ in answers if status == 503), (
                "every 503 tells the provider when to retry"
            )
            filler.unlink()
            freed_at = time.monotonic()
            for n in range(MAX_POSTS, MAX_POSTS + 100):
                answers.append(await post(session, relay.input_url(), n))
                if answers[-1][0] == 200:
                    break
            recovery_ms = (time.monotonic() - freed_at) * 1000
        assert answers[-1][0] == 200, "still refusing webhooks after space came back"
        accepted = {body for status, _, body in answers if status == 200}
        refused = sum(1 for status, _, _ in answers if status == 503)
        print(
            f"\ndisk full: {len(accepted)} x 200, {refused} x 503; "
            f"first 200 {recovery_ms:.0f} ms after space returned"
        )
        async with harness.Target() as target:
            agents(target.url, "--max-in-flight", "32")
            await target.wait_for(len(accepted), timeout=60)
            events = await relay.cli_json("event", "list", "--limit", "1000")
            assert {r.body for r in target.received} == accepted, (
                "exactly the events answered 200 are delivered"
            )
        assert len(events) == len(accepted), "a 503'd webhook was stored"
        assert relay.proc is not None and relay.proc.poll() is None, "the server died"
        relay.stop()


async def test_a_large_body_the_disk_cannot_hold_gets_503_and_leaves_no_partial_file(
    relay: harness.Relay, tmp_path: pathlib.Path
) -> None:
    """Bodies of 1 MiB or more are files beside the database (store/bodyfiles.py)."""
    with small_filesystem(tmp_path / "tiny", size="8m") as tiny:
        for item in (relay.home / "var").iterdir():
            shutil.copy2(item, tiny / item.name)
        shutil.rmtree(relay.home / "var")
        (relay.home / "var").symlink_to(tiny)
        relay.start()
        await relay.wait_ready()
        filler = fill(tiny, 1024 * 1024)  # room for small webhooks, not for this body
        body = os.urandom(3 * 1024 * 1024)
        bodies = tiny / (relay.db_path.name + ".bodies")
        async with ClientSession() as session:
            async with session.post(relay.input_url(), data=io.BytesIO(body)) as resp:
                assert (resp.status, bool(resp.headers.get("Retry-After"))) == (503, True)
            assert not bodies.exists() or list(bodies.iterdir()) == [], "a partial file stayed"
            async with session.post(relay.input_url(), data=b"small") as resp:
                assert resp.status == 200, "small webhooks still go in"
            filler.unlink()
            async with session.post(relay.input_url(), data=io.BytesIO(body)) as resp:
                assert resp.status == 200, "taken once the space is back"
        (stored,) = bodies.iterdir()
        shown = await relay.cli("event", "show", stored.name, "--json")
        assert f'"size": {len(body)}' in shown.stdout
        assert len(await relay.cli_json("event", "list")) == 2, "the 503'd body was not stored"
        relay.stop()
