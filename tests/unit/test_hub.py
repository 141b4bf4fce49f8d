"""The hub's shared idle marks: many sessions on the same outputs look once per window."""

from __future__ import annotations

import asyncio
import time

from relay_server import models
from relay_server.dispatch import hub as hub_mod


def test_an_idle_look_answers_for_every_session_on_the_same_outputs() -> None:
    hub = hub_mod.Hub()
    assert not hub.recently_idle(["a", "b"], 0.5), "nobody looked yet"
    hub.found_idle(["b", "a"])
    assert hub.recently_idle(["a", "b"], 0.5), "the same outputs, in any order"
    assert not hub.recently_idle(["a"], 0.5), "another set of outputs looks for itself"


def test_new_work_or_time_ends_the_idle_mark() -> None:
    hub = hub_mod.Hub()
    hub.found_idle(["a", "b"])
    hub.notify(["b"])
    assert not hub.recently_idle(["a", "b"], 0.5), "an event for b: look again at once"
    hub.found_idle(["a", "b"])
    time.sleep(0.06)
    assert not hub.recently_idle(["a", "b"], 0.05), "the mark lasts only the window"
    assert hub.recently_idle(["a", "b"], 5)


def test_each_event_wakes_the_next_session_with_credit() -> None:
    """A burst is spread over a bucket's sessions, not sent to all of them at once."""
    hub = hub_mod.Hub()
    full = {"c": True}
    wakes = {name: asyncio.Event() for name in "abc"}
    for name, wake in wakes.items():
        hub.register(["out"], wake, (lambda n=name: n != "c" or not full["c"]))
    hub.notify(["out"])
    assert [n for n, w in wakes.items() if w.is_set()] == ["a"]
    hub.notify(["out"])
    assert [n for n, w in wakes.items() if w.is_set()] == ["a", "b"], "the next one in turn"
    wakes["a"].clear()
    hub.notify(["out"])
    assert not wakes["c"].is_set(), "a session without credit is not sent to claim"
    assert wakes["a"].is_set(), "the next free one is, even if it was woken before"
    for wake in wakes.values():
        wake.clear()
    full["c"] = False
    hub.notify(["out"])
    assert [n for n, w in wakes.items() if w.is_set()] == ["c"], "woken ones went to the back"
    hub.notify(["out"], every=True)
    assert all(w.is_set() for w in wakes.values())


def test_with_no_session_free_every_one_keeps_the_news_for_its_next_claim() -> None:
    hub = hub_mod.Hub()
    wakes = [asyncio.Event(), asyncio.Event()]
    for wake in wakes:
        hub.register(["out"], wake, lambda: False)
    hub.notify(["out"])
    assert all(wake.is_set() for wake in wakes)


def test_a_new_event_takes_a_free_place_of_the_next_session_in_turn() -> None:
    """Hand-off at ingest: places are offered round robin, never by a session without one."""
    hub = hub_mod.Hub()
    free = {"a": 1, "b": 1, "c": 0}
    given: list[str] = []

    def offer_of(name: str) -> models.Offer:
        def offer(output_id: str) -> models.Slot | None:
            if free[name] == 0:
                return None
            free[name] -= 1
            return models.Slot(
                holder=name,
                lease_ms=1000,
                bucket="b",
                output="default",
                give=lambda lease: given.append(lease.lease_id),
                cancel=lambda: None,
            )

        return offer

    for name in "abc":
        hub.register(["out"], asyncio.Event(), lambda: True, offer_of(name))
    hub.register(["other"], asyncio.Event(), lambda: True)  # offers nothing

    taken = [hub.offer("out"), hub.offer("out"), hub.offer("out")]
    assert [slot.holder if slot else None for slot in taken] == ["a", "b", None]
    assert hub.offer("other") is None and hub.offer("unknown") is None
    free["a"] = 1
    slot = hub.offer("out")
    assert slot is not None and slot.holder == "a", "c still has no place; a is next in turn"
