"""The answer format handed between replicas: what goes in comes out, checked again."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from relay_server.dispatch import wait_relay
from relay_server.ingress import answers

names = st.from_regex(r"X-[A-Za-z0-9-]{1,20}", fullmatch=True)
values = st.from_regex(r"[\x21-\x7e]([\x20-\x7e]{0,40}[\x21-\x7e])?", fullmatch=True)


@given(
    status=st.integers(200, 599).filter(lambda s: s not in answers.NO_BODY_STATUSES),
    headers=st.lists(st.tuples(names, values), max_size=5),
    body=st.binary(max_size=2000),
)
def test_an_answer_survives_the_trip(
    status: int, headers: list[tuple[str, str]], body: bytes
) -> None:
    answer = answers.Answer(status=status, headers=tuple(headers), body=body)
    assert wait_relay.decode(wait_relay.encode(answer)) == answer


def test_a_tampered_answer_is_checked_like_a_reply() -> None:
    """A header smuggling a line break, or a bad status, never reaches the caller."""
    evil = b'{"status":200,"headers":[["X-Ok","1"],["X-Bad","a\\r\\nSet-Cookie: x"]]}\nbody'
    assert wait_relay.decode(evil) == answers.Answer(
        status=200, headers=(("X-Ok", "1"),), body=b"body"
    )
    assert wait_relay.decode(b'{"status":99,"headers":[]}\n') == answers.BAD_GATEWAY
