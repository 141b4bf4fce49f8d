"""Bucket policy: the dedup key, validation, and the CLI flags that edit a policy."""

from __future__ import annotations

import click
import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay_server import (
    cli,  # noqa: F401  (first: importing it registers the command modules)
    models,
)
from relay_server.cli_buckets import apply_policy

ids = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=80
)
names = st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,30}", fullmatch=True)


@given(name=names, value=ids)
def test_the_key_ignores_header_case_but_not_value_case(name: str, value: str) -> None:
    key = models.dedup_key((name,), ((name.upper(), value),))
    assert key is not None and len(key) == 64
    assert models.dedup_key((name.lower(),), ((name, value),)) == key
    if value.swapcase() != value:
        assert models.dedup_key((name,), ((name, value.swapcase()),)) != key


@given(value=ids)
def test_the_first_configured_header_present_wins(value: str) -> None:
    headers = (("X-B", value), ("X-A", "other"))
    assert models.dedup_key(("X-A", "X-B"), headers) == models.dedup_key(("X-A",), headers)
    assert models.dedup_key(("X-Missing", "X-B"), headers) == models.dedup_key(("X-B",), headers)
    assert models.dedup_key(("X-A",), headers) != models.dedup_key(("X-B",), (("X-B", "other"),))


def test_no_key_without_a_usable_id() -> None:
    assert models.dedup_key((), (("X-Provider-Event-Id", "1"),)) is None, "dedup off"
    assert models.dedup_key(("X-Id",), ()) is None
    assert models.dedup_key(("X-Id",), (("X-Id", "  "),)) is None, "blank"
    too_long = "x" * (models.MAX_DEDUP_VALUE + 1)
    assert models.dedup_key(("X-Id",), (("X-Id", too_long),)) is None, "not an id"


def test_a_policy_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="retention_ms must be positive"):
        models.BucketPolicy(retention_ms=0)
    with pytest.raises(ValueError, match="at most 8 dedup headers"):
        models.BucketPolicy(dedup_headers=tuple(f"X-{n}" for n in range(9)))


def flags(**given: object) -> dict[str, object]:
    base: dict[str, object] = {
        "max_attempts": None,
        "max_age": None,
        "retention": None,
        "dlq_retention": None,
        "dedup_headers": (),
        "dedup_presets": (),
        "no_dedup": False,
        "dedup_window": None,
        "ephemeral": None,
    }
    return {**base, **given}


def test_flags_left_out_keep_the_current_values() -> None:
    base = models.BucketPolicy(max_attempts=5, dedup_headers=("X-Mine",))
    assert apply_policy(base, flags()) == base
    changed = apply_policy(base, flags(retention="30d", dlq_retention="12h", dedup_window="1h"))
    assert (changed.retention_ms, changed.dlq_retention_ms, changed.dedup_window_ms) == (
        30 * models.DAY_MS,
        12 * models.HOUR_MS,
        models.HOUR_MS,
    )
    assert (changed.max_attempts, changed.dedup_headers) == (5, ("X-Mine",))


def test_presets_add_to_the_header_list_and_no_dedup_clears_it() -> None:
    base = models.BucketPolicy()
    assert apply_policy(
        base, flags(dedup_presets=("github", "standard-webhooks"))
    ).dedup_headers == (
        "X-Provider-Event-Id",
        "X-GitHub-Delivery",
        "webhook-id",
    )
    named = apply_policy(base, flags(dedup_headers=("X-Id", "x-id"), dedup_presets=("svix",)))
    assert named.dedup_headers == ("X-Id", "svix-id"), "named headers replace; case-insensitive"
    assert apply_policy(base, flags(no_dedup=True)).dedup_headers == ()
    with pytest.raises(click.UsageError, match="cannot be combined"):
        apply_policy(base, flags(no_dedup=True, dedup_presets=("github",)))
    with pytest.raises(click.UsageError, match="is not a header name"):
        apply_policy(base, flags(dedup_headers=("Bad Header:",)))
    with pytest.raises(click.UsageError, match="must be positive"):
        apply_policy(base, flags(retention="0s"))
