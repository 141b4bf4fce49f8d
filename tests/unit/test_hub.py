"""The hub's shared idle marks: many sessions on the same outputs look once per window."""

from __future__ import annotations

import asyncio
import time

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
    hub.notify(["out"])
    assert not wakes["c"].is_set(), "a session without credit is not sent to claim"
    for wake in wakes.values():
        wake.clear()
    full["c"] = False
    hub.notify(["out"])
    assert [n for n, w in wakes.items() if w.is_set()] == ["c"], "woken ones went to the back"
    hub.notify(["out"], every=True)
    assert all(w.is_set() for w in wakes.values())
