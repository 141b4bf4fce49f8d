"""The agent's optional local endpoints: `/healthz` and Prometheus `/metrics`.

Served only when asked (`--metrics-listen 127.0.0.1:9464`), on an address of the
operator's choosing; nothing here is reachable from the relay server.

/healthz answers 200 while at least one stream to the server is open and 503 while none
is (the agent keeps reconnecting; the body says since when), so a container or
supervisor health check tells "running but cut off" from "working".
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from relay_agent import models


class AgentMetrics:
    """Counters and gauges of one agent process (all its subscriptions)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._connected = Gauge(
            "stowhook_agent_connected",
            "Open streams to the relay server.",
            registry=self.registry,
        )
        self._in_flight = Gauge(
            "stowhook_agent_in_flight",
            "Deliveries being handled by a destination now.",
            registry=self.registry,
        )
        self._delivered = Counter(
            "stowhook_agent_delivered",
            "Deliveries the destination took (ACK).",
            ["bucket"],
            registry=self.registry,
        )
        self._failed = Counter(
            "stowhook_agent_failed",
            "Deliveries the destination failed (NACK or reject).",
            ["bucket", "outcome"],
            registry=self.registry,
        )
        self._last_delivery = Gauge(
            "stowhook_agent_last_delivery_timestamp_seconds",
            "Unix time of the last delivery the destination took.",
            registry=self.registry,
        )
        self.streams = 0
        self.disconnected_since: float | None = time.time()

    def stream_opened(self) -> None:
        self.streams += 1
        self._connected.set(self.streams)
        self.disconnected_since = None

    def stream_closed(self) -> None:
        self.streams = max(self.streams - 1, 0)
        self._connected.set(self.streams)
        if self.streams == 0:
            self.disconnected_since = time.time()

    def delivery_started(self) -> None:
        self._in_flight.inc()

    def delivery_finished(self, bucket: str, outcome: models.Outcome | None) -> None:
        """`outcome` None: the work was abandoned (lease lost, shutdown), nothing settled."""
        self._in_flight.dec()
        if outcome is None:
            return
        if isinstance(outcome, models.Ack):
            self._delivered.labels(bucket=bucket).inc()
            self._last_delivery.set(time.time())
        else:
            name = "reject" if isinstance(outcome, models.Reject) else "nack"
            self._failed.labels(bucket=bucket, outcome=name).inc()


METRICS = web.AppKey("metrics", AgentMetrics)


def create_app(metrics: AgentMetrics) -> web.Application:
    app = web.Application()
    app[METRICS] = metrics
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", exposition)
    return app


async def healthz(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    if metrics.streams > 0:
        return web.json_response({"status": "ok", "streams": metrics.streams})
    return web.json_response(
        {"status": "disconnected", "since": metrics.disconnected_since}, status=503
    )


async def exposition(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


@dataclass(slots=True)
class MetricsServer:
    """The local HTTP listener; `async with` starts and stops it."""

    metrics: AgentMetrics
    host: str
    port: int
    _runner: web.AppRunner | None = None

    async def __aenter__(self) -> MetricsServer:
        self._runner = web.AppRunner(create_app(self.metrics), access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
