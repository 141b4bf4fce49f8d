"""Baseline `grpc-window`: the ceiling of one grpc.aio bidi stream, with no relay behind it.

    python -m bench.grpc_window serve PORT
    python -m bench.grpc_window drive PORT [--seconds 5] [--in-flight 64] [--body-bytes 1024]

`serve` speaks the relay's own protocol (relay_proto) and nothing else: after the
Subscribe it pushes one Delivery with a 1 KiB body per ServerMessage while fewer than
`max_in_flight` are unacknowledged; each Ack gives credit back. `drive` connects, acks
every delivery as it arrives (one Ack each), and after --seconds prints one JSON line:
{"messages", "seconds", "rate"}. The server runs on uvloop like relay-server, the client
on asyncio like relay-agent. Loopback only; bounded by --seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import AsyncIterator

import grpc
import grpc.aio

from bench import procs
from relay_proto import relay_pb2, relay_pb2_grpc

MAX_DRIVE_S = 600.0


class Pusher(relay_pb2_grpc.AgentRelayServicer):
    """Pushes deliveries while the client has credit; acks give it back."""

    def __init__(self, body: bytes) -> None:
        self._body = body

    async def Connect(
        self,
        request_iterator: AsyncIterator[relay_pb2.AgentMessage],
        context: grpc.aio.ServicerContext,
    ) -> None:
        requests = aiter(request_iterator)
        first = await anext(requests)
        credit = asyncio.Semaphore(first.subscribe.max_in_flight or 64)

        async def read_acks() -> None:
            async for message in requests:
                for _ in message.ack.lease_ids:
                    credit.release()

        reader = asyncio.create_task(read_acks(), name="window-acks")
        try:
            for n in range(2**62):
                await credit.acquire()
                if reader.done():
                    return
                delivery = relay_pb2.Delivery(lease_id=str(n), event_id=str(n), body=self._body)
                batch = relay_pb2.DeliveryBatch(deliveries=[delivery])
                await context.write(relay_pb2.ServerMessage(deliveries=batch))
        finally:
            reader.cancel()


async def serve(port: int, body_bytes: int) -> None:
    server = grpc.aio.server()
    relay_pb2_grpc.add_AgentRelayServicer_to_server(Pusher(b"x" * body_bytes), server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(json.dumps({"ready": True}), flush=True)
    await server.wait_for_termination()


async def drive(port: int, seconds: float, in_flight: int) -> dict[str, float]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        stub = relay_pb2_grpc.AgentRelayStub(channel)  # type: ignore[no-untyped-call]
        call = stub.Connect()
        subscribe = relay_pb2.Subscribe(buckets=["window"], max_in_flight=in_flight)
        await call.write(relay_pb2.AgentMessage(subscribe=subscribe))
        received = 0
        started = time.monotonic()
        deadline = started + seconds
        while time.monotonic() < deadline:
            message = await call.read()
            if message is grpc.aio.EOF:
                break
            received += len(message.deliveries.deliveries)
            ack = relay_pb2.Ack(lease_ids=[d.lease_id for d in message.deliveries.deliveries])
            await call.write(relay_pb2.AgentMessage(ack=ack))
        elapsed = time.monotonic() - started
        call.cancel()
    return {"messages": received, "seconds": round(elapsed, 4), "rate": received / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.grpc_window")
    parser.add_argument("mode", choices=("serve", "drive"))
    parser.add_argument("port", type=int)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--body-bytes", type=int, default=1024)
    options = parser.parse_args()
    if options.mode == "serve":
        procs.run_fast(serve(options.port, options.body_bytes))  # uvloop, as relay-server
        return
    seconds = min(options.seconds, MAX_DRIVE_S)
    print(json.dumps(asyncio.run(drive(options.port, seconds, options.in_flight))), flush=True)


if __name__ == "__main__":
    main()
