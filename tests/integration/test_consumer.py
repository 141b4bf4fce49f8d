"""The SDK Consumer against a scripted in-process AgentRelay server on 127.0.0.1.

Each test scripts what the fake server does on each Connect stream and checks both what
the caller of the consumer sees and the frames the consumer sends back.
"""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio
import pytest

import relay_agent
from relay_agent import consumer, errors
from relay_proto import relay_pb2
from tests.integration import test_agent_relay
from tests.integration.test_agent_relay import (
    WAIT_S,
    FakeStream,
    Script,
    agent_settings,
    make_delivery,
)

Frames = asyncio.Queue[relay_pb2.AgentMessage]


serve = test_agent_relay.start_relay  # the same fake relay server fixture


def delivering(*deliveries: relay_pb2.Delivery, frames: Frames, **welcome: int) -> Script:
    """A script: welcome, deliver, then put every frame the consumer sends on `frames`."""

    async def script(stream: FakeStream) -> None:
        await stream.welcome(**welcome)
        if deliveries:
            await stream.deliver(*deliveries)
        while (frame := await stream.recv()) is not None:
            frames.put_nowait(frame)

    return script


async def next_event(events: relay_agent.Consumer) -> relay_agent.Event:
    return await asyncio.wait_for(anext(events), WAIT_S)


async def next_frame(frames: Frames) -> relay_pb2.AgentMessage:
    return await asyncio.wait_for(frames.get(), WAIT_S)


def kinds(frames: Frames) -> list[str]:
    return [str(frames.get_nowait().WhichOneof("kind")) for _ in range(frames.qsize())]


async def test_events_carry_the_delivery_and_each_outcome_reaches_the_server(serve) -> None:
    frames: Frames = asyncio.Queue()
    script = delivering(
        make_delivery("d1.1", event_id="e1"),
        make_delivery("d2.1", event_id="e2"),
        make_delivery("d3.1", event_id="e3"),
        frames=frames,
    )
    _, port = await serve(script)
    async with relay_agent.Consumer(agent_settings(port)) as events:
        first, second, third = [await next_event(events) for _ in range(3)]
        assert (first.id, first.lease_id, first.bucket, first.input_id) == (
            "e1",
            "d1.1",
            "orders",
            "in-1",
        )
        assert (first.method, first.path, first.query) == ("POST", "/github", "a=1&a=2")
        assert first.headers == (("Content-Type", "application/json"),)
        assert first.json() == {"ok": True} and first.attempt == 1 and not first.replay
        assert first.received_at.tzinfo is not None
        await first.ack()
        await second.nack(retry_after=2.5, reason="busy")
        await third.reject("poison")
        ack, nack, reject = sorted(
            [await next_frame(frames) for _ in range(3)], key=lambda f: f.WhichOneof("kind")
        )
    assert list(ack.ack.lease_ids) == ["d1.1"]
    assert (nack.nack.lease_id, nack.nack.retry_after_ms, nack.nack.reason) == (
        "d2.1",
        2500,
        "busy",
    )
    assert (reject.reject.lease_id, reject.reject.reason) == ("d3.1", "poison")
    assert first.settled and not first.lost
    assert kinds(frames) == []  # nothing was left to release on close


async def test_an_event_is_settled_once(serve) -> None:
    frames: Frames = asyncio.Queue()
    _, port = await serve(delivering(make_delivery("d1.1"), frames=frames))
    async with relay_agent.Consumer(agent_settings(port)) as events:
        event = await next_event(events)
        await event.ack()
        with pytest.raises(errors.AlreadySettled) as caught:
            await event.nack()
        with pytest.raises(errors.AlreadySettled):
            await event.extend()
    assert caught.value.lease_id == "d1.1"
    assert kinds(frames) == ["ack"]


async def test_never_more_handed_out_and_unsettled_than_granted(serve) -> None:
    frames: Frames = asyncio.Queue()
    deliveries = [make_delivery(f"d{n}.1", event_id=f"e{n}") for n in range(3)]
    _, port = await serve(delivering(*deliveries, frames=frames, max_in_flight=2))
    async with relay_agent.Consumer(agent_settings(port)) as events:
        first, second = await next_event(events), await next_event(events)
        third = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0.2)
        assert not third.done()  # two are out and unsettled: the third waits
        await second.ack()
        assert (await asyncio.wait_for(third, WAIT_S)).id == "e2"
        await first.ack()
        await (third.result()).ack()


async def test_a_cancelled_wait_for_the_next_event_loses_nothing(serve) -> None:
    frames: Frames = asyncio.Queue()
    release = asyncio.Event()

    async def script(stream: FakeStream) -> None:
        await stream.welcome()
        await release.wait()
        await stream.deliver(make_delivery("d1.1"))
        while (frame := await stream.recv()) is not None:
            frames.put_nowait(frame)

    _, port = await serve(script)
    async with relay_agent.Consumer(agent_settings(port)) as events:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await anext(events)
        release.set()
        event = await next_event(events)
        await event.ack()
    assert list((await next_frame(frames)).ack.lease_ids) == ["d1.1"]


async def test_heartbeats_extend_every_held_lease_in_one_frame(serve) -> None:
    frames: Frames = asyncio.Queue()
    script = delivering(make_delivery("d1.1"), make_delivery("d2.1"), frames=frames, lease_ms=300)
    _, port = await serve(script)
    async with relay_agent.Consumer(agent_settings(port)) as events:
        handed_out = await next_event(events)  # the other one waits in the buffer
        extend = await next_frame(frames)
        assert extend.WhichOneof("kind") == "extend"
        assert sorted(extend.extend.lease_ids) == ["d1.1", "d2.1"]
        assert extend.extend.extend_ms == 300
        await handed_out.ack()


async def test_without_auto_extend_only_an_explicit_extend_keeps_an_event(serve) -> None:
    frames: Frames = asyncio.Queue()
    script = delivering(make_delivery("d1.1"), make_delivery("d2.1"), frames=frames, lease_ms=300)
    _, port = await serve(script)
    settings = agent_settings(port, max_in_flight=2)
    async with relay_agent.Consumer(settings, auto_extend=False) as events:
        first, second = await next_event(events), await next_event(events)
        await asyncio.sleep(0.25)  # more than two heartbeat periods
        assert kinds(frames) == []
        await first.extend(2)
        explicit = await next_frame(frames)
        assert (list(explicit.extend.lease_ids), explicit.extend.extend_ms) == (["d1.1"], 2000)
        heartbeat = await next_frame(frames)  # from now on the heartbeat keeps it, at 2 s
        assert (list(heartbeat.extend.lease_ids), heartbeat.extend.extend_ms) == (["d1.1"], 2000)
        await first.ack()
        await second.ack()


async def test_a_lost_lease_is_never_settled_and_its_guarded_work_is_cancelled(serve) -> None:
    frames: Frames = asyncio.Queue()
    notify = asyncio.Event()

    async def script(stream: FakeStream) -> None:
        await stream.welcome()
        await stream.deliver(make_delivery("d7.2"))
        await notify.wait()
        notice = relay_pb2.LeaseNotice(
            lease_ids=["d7.2"], code=relay_pb2.LeaseNotice.LEASE_LOST, message="expired"
        )
        await stream.send(relay_pb2.ServerMessage(notice=notice))
        while (frame := await stream.recv()) is not None:
            frames.put_nowait(frame)

    _, port = await serve(script)
    async with relay_agent.Consumer(agent_settings(port)) as events:
        event = await next_event(events)
        with pytest.raises(errors.LeaseLost) as caught:
            async with event.guard():
                notify.set()
                await asyncio.sleep(WAIT_S)  # the work: cut short by the notice
        assert "expired" in str(caught.value) and caught.value.lease_id == "d7.2"
        assert event.lost
        with pytest.raises(errors.LeaseLost):
            await event.ack()
    assert kinds(frames) == []  # no ack, and no nack on close either


async def test_a_guard_lets_other_cancellations_through(serve) -> None:
    frames: Frames = asyncio.Queue()
    _, port = await serve(delivering(make_delivery("d1.1"), frames=frames))
    async with relay_agent.Consumer(agent_settings(port)) as events:
        event = await next_event(events)

        async def work() -> None:
            async with event.guard():
                await asyncio.sleep(WAIT_S)

        task = asyncio.create_task(work())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not event.lost and not event.settled
    assert kinds(frames) == ["nack"]  # released on close


async def test_closing_nacks_what_is_unsettled_for_a_retry_at_once(serve) -> None:
    frames: Frames = asyncio.Queue()
    script = delivering(make_delivery("d1.1"), make_delivery("d2.1"), frames=frames)
    _, port = await serve(script)
    async with relay_agent.Consumer(agent_settings(port)) as events:
        event = await next_event(events)  # d2.1 stays in the buffer
    nacks = [await next_frame(frames) for _ in range(2)]
    assert sorted(frame.nack.lease_id for frame in nacks) == ["d1.1", "d2.1"]
    assert {(f.nack.retry_after_ms, f.nack.reason) for f in nacks} == {(1, "agent shutting down")}
    with pytest.raises(errors.LeaseLost, match="closed"):
        await event.ack()
    with pytest.raises(RuntimeError, match="only be started once"):
        await events.__aenter__()


async def test_close_may_say_why_it_releases_the_events(serve) -> None:
    frames: Frames = asyncio.Queue()
    _, port = await serve(delivering(make_delivery("d1.1"), frames=frames))
    async with relay_agent.Consumer(agent_settings(port)) as events:
        await next_event(events)
        await events.close(reason="deploying")
        await events.close(reason="ignored: the first close counts")
    frame = await next_frame(frames)
    assert (frame.nack.lease_id, frame.nack.reason) == ("d1.1", "deploying")


async def test_stop_ends_the_iteration_but_held_events_can_still_be_settled(serve) -> None:
    frames: Frames = asyncio.Queue()
    _, port = await serve(delivering(make_delivery("d1.1"), frames=frames))
    async with relay_agent.Consumer(agent_settings(port)) as events:
        event = await next_event(events)
        events.stop()
        events.stop()
        assert [item async for item in events] == []
        await event.ack()
    assert kinds(frames) == ["ack"]


async def test_a_settlement_survives_the_cancellation_of_its_caller(serve) -> None:
    frames: Frames = asyncio.Queue()
    _, port = await serve(delivering(make_delivery("d1.1"), frames=frames))
    async with relay_agent.Consumer(agent_settings(port)) as events:
        event = await next_event(events)
        acking = asyncio.create_task(event.ack())
        await asyncio.sleep(0)  # the ack is on its way
        acking.cancel()
        with pytest.raises(asyncio.CancelledError):
            await acking
        assert list((await next_frame(frames)).ack.lease_ids) == ["d1.1"]


async def test_a_broken_stream_loses_its_events_and_the_consumer_reconnects(serve) -> None:
    frames: Frames = asyncio.Queue()

    async def script(stream: FakeStream) -> None:
        await stream.welcome()
        if len(relay.streams) == 1:
            await stream.deliver(make_delivery("d1.1"))
            await asyncio.sleep(0.2)
            return  # the stream ends with the event unsettled
        await stream.deliver(make_delivery("d1.2", attempt=2))
        while (frame := await stream.recv()) is not None:
            frames.put_nowait(frame)

    relay, port = await serve(script)
    async with relay_agent.Consumer(agent_settings(port)) as events:
        first = await next_event(events)
        again = await next_event(events)
        assert first.lost and again.lease_id == "d1.2" and again.attempt == 2
        with pytest.raises(errors.LeaseLost, match="stream"):
            await first.ack()
        await again.ack()
        assert events.connected
    assert list((await next_frame(frames)).ack.lease_ids) == ["d1.2"]


async def test_a_refused_token_ends_the_iteration_with_token_refused(serve) -> None:
    async def script(stream: FakeStream) -> None:
        await stream.context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown token")

    _, port = await serve(script)
    async with relay_agent.Consumer(agent_settings(port)) as events:
        with pytest.raises(errors.TokenRefused):
            await asyncio.wait_for(events.wait_connected(), WAIT_S)
        with pytest.raises(errors.TokenRefused):
            await next_event(events)
        assert events.last_error is not None and "refused" in events.last_error


async def test_an_unreachable_server_is_retried_until_closed() -> None:
    with __import__("socket").socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with relay_agent.Consumer(agent_settings(port)) as events:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await events.wait_connected()
        assert not events.connected and events.last_error is not None


async def test_a_consumer_must_be_started_before_use() -> None:
    events = consumer.Consumer(agent_settings(1))
    with pytest.raises(RuntimeError, match="start the Consumer first"):
        await anext(events)
    await events.close()  # never started: nothing to do
