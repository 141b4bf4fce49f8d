"""Baseline processes for the benchmarks: `bare` (read body, answer 200) and `sink`
(the same, counting requests, with GET /count). Run: python -m bench.apps bare|sink PORT."""

from __future__ import annotations

import sys

from aiohttp import web


def make_app(kind: str) -> web.Application:
    count = {"n": 0}

    async def receive(request: web.Request) -> web.Response:
        await request.read()
        count["n"] += 1
        return web.Response()

    async def counted(request: web.Request) -> web.Response:
        return web.json_response(count)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    if kind == "sink":
        app.router.add_get("/count", counted)
    app.router.add_route("*", "/{tail:.*}", receive)
    return app


def main() -> None:
    kind, port = sys.argv[1], int(sys.argv[2])
    loop_factory = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        pass
    web.run_app(
        make_app(kind),
        host="127.0.0.1",
        port=port,
        print=None,
        access_log=None,
        loop=loop_factory() if loop_factory else None,
    )


if __name__ == "__main__":
    main()
