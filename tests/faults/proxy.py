"""A TCP proxy on 127.0.0.1 that a test cuts silently, like a dead NAT entry or a pulled cable.

`cut()` stops forwarding in both directions without closing anything: both peers keep
an open socket, their writes still succeed (into buffers), and nothing arrives: no data,
no FIN, no RST. Only a timeout (gRPC keepalive, a lease) can tell them the path is dead.

`heal()` forwards again. As TCP retransmission would, what each side wrote during the
cut is then delivered (it waited in the proxy's and the kernels' buffers), and a side
that gave up meanwhile has closed its socket: its peer sees that close after the bytes
sent before it. A connection opened during the cut reaches the server only if its client
still waits at the heal, as a retransmitted SYN would.
"""

from __future__ import annotations

import asyncio
import contextlib

from bench.procs import free_port

CHUNK_BYTES = 64 * 1024
# On heal, what a connection accepted during the cut sent is read until this long passes
# without more (or until it turns out closed).
HELD_READ_S = 0.05


class Proxy:
    """Forwards 127.0.0.1:<port> to `upstream` ("host:port") until cut."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self._upstream = (host, int(port))
        self.port = free_port()
        self._open = asyncio.Event()
        self._open.set()
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()  # asyncio's, one per connection
        self._work: set[asyncio.Task[None]] = set()  # ours, one per connection

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def is_cut(self) -> bool:
        return not self._open.is_set()

    def cut(self) -> None:
        """Stop forwarding, both ways, on every connection; close nothing."""
        self._open.clear()

    def heal(self) -> None:
        """Forward again, on the held connections and on new ones."""
        self._open.set()

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for work in list(self._work):
            work.cancel()
        # Each handler then closes its client socket and returns; a handler left running
        # would be cancelled by the loop's teardown, which asyncio reports as an error.
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        handler.add_done_callback(self._handlers.discard)
        work = asyncio.create_task(self._forward(client_r, client_w))
        self._work.add(work)
        try:
            await asyncio.wait({work})  # returns, never raises, when __aexit__ cancels it
        finally:
            self._work.discard(work)
            client_w.close()
            with contextlib.suppress(OSError):
                await client_w.wait_closed()

    async def _forward(
        self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
    ) -> None:
        sent_while_cut = b""
        if self.is_cut:
            # A connection attempt into the black hole reaches the server only if its
            # client still waits when the path heals (a retransmitted SYN gets through),
            # never if the client gave up meanwhile.
            await self._open.wait()
            held = await _held_bytes(client_r)
            if held is None:
                return
            sent_while_cut = held
        try:
            server_r, server_w = await asyncio.open_connection(*self._upstream)
        except OSError:
            return
        server_w.write(sent_while_cut)
        pipes = [
            asyncio.create_task(self._pipe(client_r, server_w)),
            asyncio.create_task(self._pipe(server_r, client_w)),
        ]
        try:
            # One side closed (after a heal, if it happened during a cut): close both,
            # as the end-to-end connection would be.
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pipe in pipes:
                pipe.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
            server_w.close()
            with contextlib.suppress(OSError):
                await server_w.wait_closed()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while True:
                await self._open.wait()  # while cut, read nothing more
                data = await reader.read(CHUNK_BYTES)
                if not data:
                    return
                await self._open.wait()  # cut while a read was pending: hold the chunk
                writer.write(data)
                await writer.drain()


async def _held_bytes(reader: asyncio.StreamReader) -> bytes | None:
    """What a client sent before the heal, or None if it also closed the connection."""
    data = b""
    while True:
        try:
            chunk = await asyncio.wait_for(reader.read(CHUNK_BYTES), HELD_READ_S)
        except TimeoutError:
            return data
        if not chunk:
            return None
        data += chunk
