"""The public aiohttp app. A webhook is answered 200 only after it is committed.

Unknown inputs get the same empty 200 as known ones (nothing is stored), so a stranger
cannot enumerate inputs (`--unknown-input 404` if the operator prefers); responses name
no server software. What a known input answers is its response mode (answers.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import time
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from relay_server import errors, ids, models, throttle
from relay_server.dispatch import hub as hub_mod
from relay_server.ingress import answers, gate, limits, routes, source
from relay_server.settings import IngressSettings
from relay_server.store import sql

log = structlog.get_logger(__name__)

STORE = web.AppKey("store", sql.SqlStore)
HUB = web.AppKey("hub", hub_mod.Hub)
ROUTES = web.AppKey("routes", routes.RouteCache)
SETTINGS = web.AppKey("settings", IngressSettings)
READY = web.AppKey("ready", list)  # [bool]: flipped to False when shutting down
GRPC_SERVING = web.AppKey("grpc_serving", list)  # [bool]: True while agents can connect
TRUSTED_PROXIES = web.AppKey("trusted_proxies", tuple)  # source.Network, ...

PROBE_CACHE_S = 1.0  # a flood of /readyz costs one write probe per second
PROBE_TIMEOUT_S = 2.0  # longer than this to get the write lock counts as not writable

RETRY_AFTER_S = "5"
# A webhook whose provider event id was seen within the bucket's dedup window: answered 200,
# stored nowhere, and this header names the event that holds the id.
DUPLICATE_HEADER = "X-Stowhook-Duplicate-Of"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(
    store: sql.SqlStore,
    hub: hub_mod.Hub,
    settings: IngressSettings,
    *,
    failures: throttle.FailureThrottle | None = None,  # shared with the agent streams
) -> web.Application:
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[_plain_errors])
    app[STORE] = store
    app[HUB] = hub
    app[ROUTES] = routes.RouteCache(store, settings.route_cache_s)
    app[SETTINGS] = settings
    app[TRUSTED_PROXIES] = source.parse_networks(settings.trusted_proxies)
    app[gate.GATE] = gate.Gate(failures or throttle.FailureThrottle(), app[TRUSTED_PROXIES])
    app[limits.LIMITER] = limits.RateLimiter(settings.source_rate, app[TRUSTED_PROXIES])
    app[READY] = [True]
    app[GRPC_SERVING] = [False]
    app[IN_FLIGHT] = InFlight()
    app[PROBE] = WriteProbe(store)
    app.router.add_route("*", "/in/{input_id}", receive, expect_handler=_expect)
    app.router.add_route("*", "/in/{input_id}/{tail:.*}", receive, expect_handler=_expect)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.on_response_prepare.append(_hide_server)
    return app


def _to_response(found: answers.Answer, **extra: str) -> web.Response:
    headers = [*found.headers, *extra.items()]
    return web.Response(status=found.status, headers=headers, body=found.body or None)


def _empty(status: int, **headers: str) -> web.Response:
    return web.Response(status=status, headers=headers)


class InFlight:
    """Webhooks past the shutdown check and not yet answered: shutdown waits for them.

    aiohttp's own graceful shutdown stops reading from open connections at once, so a
    request whose body is still arriving would never finish; the server waits on this
    (listening socket already closed) before handing over to aiohttp's cleanup.
    """

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # A plain context manager (`with in_flight:`), not @contextmanager: it runs per webhook.
    def __enter__(self) -> None:
        if self.count == 0:
            self._idle.clear()
        self.count += 1

    def __exit__(self, *exc_info: object) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        return self._idle.is_set()


IN_FLIGHT = web.AppKey("in_flight", InFlight)


async def receive(request: web.Request) -> web.StreamResponse:
    app = request.app
    if not app[READY][0]:
        return web.Response(status=503, text="shutting down\n", headers={"Retry-After": "1"})
    with app[IN_FLIGHT]:
        return await _receive(request)


async def _receive(request: web.Request) -> web.StreamResponse:
    app = request.app
    if (limited := app[limits.LIMITER].refuse_source(request)) is not None:
        return limited  # 429: this sender is over the per-source rate
    route = await _route_or_unavailable(request)
    if isinstance(route, web.StreamResponse):
        return route
    if route is None:
        await _discard(request)
        return _empty(app[SETTINGS].unknown_input_status)
    if (limited := app[limits.LIMITER].refuse_input(request, route)) is not None:
        return limited  # 429: this input is over its own rate
    refused = await app[gate.GATE].admit(request, route)  # throttle, bucket credentials
    if refused is not None:
        return refused
    body = await _read_body(request, route)
    if isinstance(body, web.StreamResponse):
        return body
    nonce = app[gate.GATE].verify(request, route, body)  # the provider's signature
    if isinstance(nonce, web.StreamResponse):
        return nonce
    event = gate.admitted(_incoming(request, route, body), nonce)
    structlog.contextvars.bind_contextvars(event_id=event.id)
    try:
        return await _commit_and_answer(app, event)
    except errors.Replay:
        return gate.replay(event)


async def _commit_and_answer(
    app: web.Application, event: models.IncomingEvent
) -> web.StreamResponse:
    """Commit, then answer as the input's response mode says (see answers.py); in wait
    mode the caller is registered first, so the agent is asked for the answer."""
    mode = event.route.input.response
    with app[HUB].waiting.expect(event.id, mode) as waiter:
        if waiter is not None:  # an agent on any replica will be asked for the answer
            until = models.now_ms() + mode.timeout_ms
            event = dataclasses.replace(event, caller_waits_until=until)
        hub = app[HUB]
        taken: list[str] = []  # outputs an agent held a place on: the event goes to it

        def offer(output_id: str) -> models.Slot | None:
            slot = hub.offer(output_id)
            if slot is not None:
                taken.append(output_id)
            return slot

        try:
            original = await app[STORE].ingest(event, offer)
        except errors.StorageError as exc:
            log.warning("event_not_stored", error=str(exc), **event.log_context())
            return web.Response(
                status=503, text="try again later\n", headers={"Retry-After": RETRY_AFTER_S}
            )
        if original is not None:
            log.info("event_duplicate", duplicate_of=original, **event.log_context())
            duplicate = answers.immediate(mode)
            return _to_response(duplicate, **{DUPLICATE_HEADER: original})
        # The others' sessions are woken to claim (a place given back wakes its own).
        hub.notify(
            [o for o in event.route.output_ids if o not in taken]
            if taken
            else event.route.output_ids
        )
        # debug, not info: a line per webhook cost ~10 us of the loop (render + write)
        log.debug("event_received", method=event.method, **event.log_context())
        return _to_response(await answers.answer(mode, waiter))


async def _route_or_unavailable(request: web.Request) -> models.Route | web.StreamResponse | None:
    try:
        return await request.app[ROUTES].get(request.match_info["input_id"])
    except errors.StorageError as exc:
        log.warning("route_lookup_failed", error=str(exc))
        return web.Response(
            status=503, text="try again later\n", headers={"Retry-After": RETRY_AFTER_S}
        )


async def _discard(request: web.Request) -> None:
    """Drain (and forget) an unknown input's body so the connection can be reused."""
    if request.can_read_body:
        try:
            await request.read()
        except web.HTTPRequestEntityTooLarge:
            pass


async def _read_body(request: web.Request, route: models.Route) -> bytes | web.StreamResponse:
    most = request.app[SETTINGS].max_body_bytes
    limit = min(route.input.max_body_bytes or most, most)
    length = request.content_length
    if length is not None and length > limit:
        return _too_large(limit)
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return _too_large(limit)
    return _too_large(limit) if len(body) > limit else body


def _too_large(limit: int) -> web.Response:
    return web.Response(status=413, text=f"body larger than {limit} bytes\n")


def _incoming(request: web.Request, route: models.Route, body: bytes) -> models.IncomingEvent:
    raw_path = request.rel_url.raw_path
    prefix = f"/in/{route.input.id}"
    return models.IncomingEvent(
        id=ids.new_id(),
        route=route,
        method=request.method,
        path=raw_path[len(prefix) :] if raw_path.startswith(prefix) else "",
        query=request.rel_url.raw_query_string,
        headers=tuple([(str(name), value) for name, value in request.headers.items()]),
        body=body,
        received_at=dt.datetime.now(dt.UTC),
        source=source.source_of(request, request.app[TRUSTED_PROXIES]),
    )


async def _expect(request: web.Request) -> web.StreamResponse | None:
    """Answer `Expect: 100-continue` with 413 before the client sends a body that is too big."""
    if request.version != (1, 1):
        return None
    if request.headers.get("Expect", "").lower() != "100-continue":
        return web.Response(status=417, text="unsupported Expect\n")
    limit = request.app[SETTINGS].max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        return web.Response(status=413, text=f"body larger than {limit} bytes\n")
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # as aiohttp's default handler: the body has not started
    return None


async def healthz(request: web.Request) -> web.StreamResponse:
    """Liveness: the process answers. Says nothing about the database."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.StreamResponse:
    """Readiness: a webhook sent now would be committed, and agents can connect."""
    app = request.app
    if not app[READY][0]:
        reason: str | None = "shutting down"
    elif not app[GRPC_SERVING][0]:
        reason = "agent stream server not serving"
    else:
        reason = await app[PROBE].check()
    if reason is not None:
        return web.json_response(
            {"status": "unavailable", "reason": reason},
            status=503,
            headers={"Retry-After": "1"},
        )
    return web.json_response({"status": "ready"})


class WriteProbe:
    """A real write through the writer, its outcome reused for `PROBE_CACHE_S`."""

    def __init__(self, store: sql.SqlStore) -> None:
        self._store = store
        self._lock = asyncio.Lock()  # concurrent checks share one probe
        self._checked_at = -PROBE_CACHE_S
        self._reason: str | None = None

    async def check(self) -> str | None:
        """None when the database took a write just now, else why not."""
        async with self._lock:
            if time.monotonic() - self._checked_at >= PROBE_CACHE_S:
                self._reason = await self._probe()
                self._checked_at = time.monotonic()
            return self._reason

    async def _probe(self) -> str | None:
        try:
            await asyncio.wait_for(self._store.probe_write(), PROBE_TIMEOUT_S)
        except TimeoutError:
            reason = f"database not writable: no write lock within {PROBE_TIMEOUT_S:g}s"
        except errors.StorageError as exc:
            reason = f"database not writable: {exc.message}"
        else:
            return None
        log.warning("readiness_probe_failed", reason=reason)
        return reason


PROBE = web.AppKey("probe", WriteProbe)


@web.middleware
async def _plain_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own error pages name aiohttp; answer with a bare status instead."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status == 413:
            return web.Response(status=413, text="body too large\n")
        return web.Response(status=exc.status, text=f"{exc.status}\n", headers=_safe(exc))


def _safe(exc: web.HTTPException) -> dict[str, str]:
    return {
        k: v for k, v in exc.headers.items() if k.lower() in ("allow", "location", "retry-after")
    }


async def _hide_server(request: web.Request, response: web.StreamResponse) -> None:
    # aiohttp fills in "Server: Python/x aiohttp/y" unless the header is already set.
    response.headers["Server"] = ""
