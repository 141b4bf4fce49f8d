from __future__ import annotations

import base64
import concurrent.futures
import os
import pathlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay_server import crypto, errors
from tests.unit import forked

RING = crypto.parse_key_file(crypto.generate_key_line("k1"))


@given(plaintext=st.binary(max_size=4096), aad=st.binary(max_size=64))
def test_sealed_records_open_to_the_same_bytes(plaintext: bytes, aad: bytes) -> None:
    sealed = RING.seal(plaintext, aad)
    assert RING.open(sealed, aad) == plaintext
    assert RING.key_id_of(sealed) == "k1"


@given(
    plaintext=st.binary(max_size=4096),
    aad=st.binary(max_size=64),
    chunk=st.integers(min_value=1, max_value=5000),
)
def test_a_record_sealed_in_pieces_is_a_record_like_any_other(
    plaintext: bytes, aad: bytes, chunk: int
) -> None:
    pieces = list(RING.seal_chunks(plaintext, aad, chunk_bytes=chunk))
    record = b"".join(pieces)
    assert RING.open(record, aad) == plaintext
    assert RING.is_sealed_with_primary(record)
    assert len(record) == len(RING.seal(plaintext, aad)), "the same format, byte for byte"
    assert max(len(piece) for piece in pieces) <= max(chunk, 16) + 32, "no piece holds it all"
    with pytest.raises(errors.CryptoError):
        RING.open(record, aad + b"x")


@given(plaintext=st.binary(min_size=8, max_size=512))
def test_sealed_records_do_not_contain_the_plaintext(plaintext: bytes) -> None:
    assert plaintext not in RING.seal(plaintext, b"e1:body")


def test_every_seal_uses_a_fresh_nonce() -> None:
    assert RING.seal(b"same", b"a") != RING.seal(b"same", b"a")


def _nonce_of(record: bytes) -> bytes:
    return crypto._split(record)[1]


def test_nonces_never_repeat_across_refills_and_threads() -> None:
    per_refill = crypto.NonceSource.REFILL_BYTES // crypto.NONCE_BYTES
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        batches = pool.map(
            lambda _: [_nonce_of(RING.seal(b"x", b"a")) for _ in range(3 * per_refill)], range(4)
        )
        nonces = [nonce for batch in batches for nonce in batch]
    assert all(len(nonce) == crypto.NONCE_BYTES for nonce in nonces)
    assert len(set(nonces)) == len(nonces) == 12 * per_refill


def test_a_forked_child_seals_with_nonces_its_parent_does_not() -> None:
    RING.seal(b"x", b"a")  # the parent's buffer holds unused bytes when it forks
    child, parent = forked.both_sides(lambda: [_nonce_of(RING.seal(b"x", b"a")) for _ in range(50)])
    assert not set(child) & set(parent)


def test_a_record_moved_to_another_row_does_not_open() -> None:
    sealed = RING.seal(b"payload", b"event-1:body")
    with pytest.raises(errors.CryptoError):
        RING.open(sealed, b"event-2:body")


@given(position=st.integers(min_value=0, max_value=60))
def test_any_tampered_byte_is_detected(position: int) -> None:
    sealed = bytearray(RING.seal(b"payload bytes here", b"aad"))
    position = position % len(sealed)
    sealed[position] ^= 0x01
    with pytest.raises(errors.CryptoError):
        RING.open(bytes(sealed), b"aad")


def test_a_record_of_an_unknown_key_names_the_key() -> None:
    other = crypto.parse_key_file(crypto.generate_key_line("k2"))
    with pytest.raises(errors.UnknownKeyError, match="k2"):
        RING.open(other.seal(b"x", b"a"), b"a")


def test_a_ring_with_an_old_key_opens_old_records_and_seals_with_the_primary() -> None:
    old = crypto.generate_key_line("k1")
    new = crypto.generate_key_line("k2")
    before = crypto.parse_key_file(old).seal(b"old", b"a")
    rotated = crypto.parse_key_file(f"{new}\n{old}\n")
    assert rotated.open(before, b"a") == b"old"
    assert rotated.key_id_of(rotated.seal(b"new", b"a")) == "k2"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "holds no key"),
        ("k1:not base64!", "line 1: not base64"),
        (f"k1:{base64.b64encode(bytes(16)).decode()}", "16 bytes; AES-256 needs exactly 32"),
        (
            f"a:{base64.b64encode(bytes(32)).decode()}\na:{base64.b64encode(bytes(32)).decode()}",
            "repeated",
        ),
    ],
    ids=["empty", "not-base64", "short-key", "repeated-id"],
)
def test_bad_key_files_are_refused_with_the_reason(text: str, message: str) -> None:
    with pytest.raises(errors.ConfigError, match=message):
        crypto.parse_key_file(text)


def test_a_bare_base64_key_gets_the_default_id() -> None:
    ring = crypto.parse_key_file(base64.b64encode(os.urandom(32)).decode())
    assert ring.primary_id == "k1"


def test_new_key_files_are_private_and_never_overwritten(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "var" / "key"
    crypto.write_new_key_file(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert crypto.load_key_file(path).primary_id == "k1"
    with pytest.raises(FileExistsError):
        crypto.write_new_key_file(path)


def test_a_key_file_readable_by_others_is_refused(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "key"
    crypto.write_new_key_file(path)
    path.chmod(0o644)
    with pytest.raises(errors.ConfigError, match="chmod 600"):
        crypto.load_key_file(path)


def test_a_missing_key_file_says_how_to_make_one(tmp_path: pathlib.Path) -> None:
    with pytest.raises(errors.ConfigError, match="relay-server keys generate"):
        crypto.load_key_file(tmp_path / "absent")


def test_a_rotated_key_file_keeps_every_key_the_new_one_first(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "stowhook.key"
    crypto.write_new_key_file(path)
    sealed = crypto.load_key_file(path).seal(b"old", b"a")

    with crypto.key_file_lock(path):
        rotated = crypto.add_primary_key(path)

    reread = crypto.load_key_file(path)  # refuses a file other users can read
    assert (reread.primary_id, list(reread.keys)) == ("k2", ["k2", "k1"])
    assert reread.keys == rotated.keys and reread.open(sealed, b"a") == b"old"
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


def test_new_key_ids_count_up_past_the_highest() -> None:
    assert crypto.next_key_id({"k1": b"", "k7": b"", "backup": b""}) == "k8"
    assert crypto.next_key_id({"custom": b""}) == "k1"


def test_only_one_rotation_holds_the_key_file_lock(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "stowhook.key"
    crypto.write_new_key_file(path)
    with crypto.key_file_lock(path), pytest.raises(errors.ConfigError, match="another key"):
        with crypto.key_file_lock(path):
            pass
    with crypto.key_file_lock(path):  # released
        pass
