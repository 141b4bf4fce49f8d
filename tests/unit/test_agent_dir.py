"""The dir destination: names, formats, atomic writes, start-up clean-up, failures."""

from __future__ import annotations

import datetime
import json
import os
import pathlib

import pytest

from relay_agent import errors, models, settings
from relay_agent.destinations import dir as dir_destination

RECEIVED = datetime.datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=datetime.UTC)
EVENT_ID = "01a2b3c4-0000-7000-8000-000000000001"


def make_delivery(**changes: object) -> models.Delivery:
    values: dict[str, object] = {
        "lease_id": "d1.1",
        "event_id": EVENT_ID,
        "bucket": "exports",
        "input_id": "in-1",
        "method": "POST",
        "path": "/orders",
        "query": "x=1",
        "headers": (("Content-Type", "application/json"), ("X-Dup", "1"), ("X-Dup", "2")),
        "body": '{"name": "Zoë"}'.encode(),
        "received_at": RECEIVED,
        "attempt": 1,
        "lease_deadline": RECEIVED,
        "output": "default",
        "replay": False,
    }
    values.update(changes)
    return models.Delivery(**values)  # type: ignore[arg-type]


def spool(path: pathlib.Path, fmt: settings.DirFormat = settings.DirFormat.JSON):
    return dir_destination.DirDestination(settings.DirDestinationSettings(path=path, format=fmt))


def test_file_names_sort_by_receive_time_then_event_id() -> None:
    later = RECEIVED + datetime.timedelta(microseconds=1)
    plus_two = datetime.timezone(datetime.timedelta(hours=2))
    names = [
        dir_destination.file_stem(make_delivery(received_at=later, event_id="01a0")),
        dir_destination.file_stem(make_delivery(event_id="01a2")),
        dir_destination.file_stem(make_delivery(event_id="01a1")),
        dir_destination.file_stem(make_delivery(received_at=RECEIVED.astimezone(plus_two))),
    ]
    assert names[3] == f"20240501T120000.123456Z-{EVENT_ID}"
    assert sorted(names[:3]) == [names[2], names[1], names[0]]


async def test_json_envelope(tmp_path: pathlib.Path) -> None:
    async with spool(tmp_path) as destination:
        assert await destination.deliver(make_delivery()) == models.Ack()
    [path] = list(tmp_path.iterdir())
    assert path.name == f"20240501T120000.123456Z-{EVENT_ID}.json"
    document = json.loads(path.read_text(encoding="utf-8"))
    assert document == {
        "version": 1,
        "event_id": EVENT_ID,
        "bucket": "exports",
        "output": "default",
        "input_id": "in-1",
        "method": "POST",
        "path": "/orders",
        "query": "x=1",
        "received_at": "2024-05-01T12:00:00.123456Z",
        "attempt": 1,
        "replay": False,
        "headers": [["Content-Type", "application/json"], ["X-Dup", "1"], ["X-Dup", "2"]],
        "body_size": 16,
        "body_encoding": "utf-8",
        "body": '{"name": "Zoë"}',
    }
    assert path.stat().st_mode & 0o777 == 0o640 & ~current_umask()


async def test_a_binary_body_is_base64(tmp_path: pathlib.Path) -> None:
    body = bytes(range(256))
    async with spool(tmp_path) as destination:
        await destination.deliver(make_delivery(body=body))
    [path] = list(tmp_path.iterdir())
    document = json.loads(path.read_text())
    assert document["body_encoding"] == "base64"
    assert dir_destination.decode_body(document) == body


async def test_raw_format_writes_the_body_then_the_meta(tmp_path: pathlib.Path) -> None:
    body = b"\x00\xffraw bytes"
    async with spool(tmp_path, settings.DirFormat.RAW) as destination:
        assert await destination.deliver(make_delivery(body=body)) == models.Ack()
    stem = f"20240501T120000.123456Z-{EVENT_ID}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{stem}.body", f"{stem}.meta.json"]
    assert (tmp_path / f"{stem}.body").read_bytes() == body
    meta = json.loads((tmp_path / f"{stem}.meta.json").read_text())
    assert meta["body_file"] == f"{stem}.body" and meta["body_size"] == len(body)
    assert "body" not in meta and "body_encoding" not in meta


async def test_a_redelivery_replaces_the_same_file(tmp_path: pathlib.Path) -> None:
    async with spool(tmp_path) as destination:
        await destination.deliver(make_delivery(attempt=1))
        await destination.deliver(make_delivery(attempt=2, lease_id="d1.2"))
    [path] = list(tmp_path.iterdir())
    assert json.loads(path.read_text())["attempt"] == 2


async def test_start_up_creates_the_directory_and_removes_only_our_stale_temp_files(
    tmp_path: pathlib.Path,
) -> None:
    target = tmp_path / "spool" / "deep"
    target.mkdir(parents=True)
    stale = target / f".20240501T120000.123456Z-{EVENT_ID}.json.0a1b2c3d.tmp"
    stale_raw = target / f".20240501T120000.123456Z-{EVENT_ID}.meta.json.deadbeef.tmp"
    theirs = target / ".keep.tmp"
    done = target / f"20240501T120000.123456Z-{EVENT_ID}.json"
    for path in (stale, stale_raw, theirs, done):
        path.write_text("x")
    async with spool(target):
        pass
    assert sorted(p.name for p in target.iterdir()) == [".keep.tmp", done.name]

    fresh = tmp_path / "new" / "spool"
    async with spool(fresh):
        assert fresh.is_dir()


async def test_an_unusable_directory_is_a_config_error(tmp_path: pathlib.Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(errors.ConfigError, match="cannot create the directory"):
        async with spool(a_file / "sub"):
            pass
    with pytest.raises(errors.ConfigError, match="cannot create the directory"):
        async with spool(a_file):
            pass


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
async def test_a_failed_write_is_a_nack_and_leaves_no_temp_file(tmp_path: pathlib.Path) -> None:
    async with spool(tmp_path) as destination:
        tmp_path.chmod(0o500)
        try:
            outcome = await destination.deliver(make_delivery())
        finally:
            tmp_path.chmod(0o700)
    assert isinstance(outcome, models.Nack)
    assert "Permission denied" in outcome.reason
    assert list(tmp_path.iterdir()) == []


async def test_a_failed_rename_removes_the_temp_file(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*_args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dir_destination.os, "replace", full)
    async with spool(tmp_path) as destination:
        outcome = await destination.deliver(make_delivery())
    assert outcome == models.Nack(reason=f"cannot write to {tmp_path}: No space left on device")
    assert list(tmp_path.iterdir()) == []


async def test_an_event_id_that_could_steer_a_path_is_rejected(tmp_path: pathlib.Path) -> None:
    async with spool(tmp_path) as destination:
        outcome = await destination.deliver(make_delivery(event_id="../../etc/passwd"))
    assert isinstance(outcome, models.Reject)
    assert list(tmp_path.iterdir()) == []


def test_directory_problem(tmp_path: pathlib.Path) -> None:
    assert dir_destination.directory_problem(tmp_path) is None
    assert dir_destination.directory_problem(tmp_path / "new" / "deeper") is None
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert "is not a directory" in str(dir_destination.directory_problem(a_file))
    assert "cannot be created" in str(dir_destination.directory_problem(a_file / "sub"))


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
