"""`RelayServer`: ingress, agent streams and the reaper on one event loop.

Shutdown order, always the same: report NOT_SERVING -> stop taking webhooks (in-flight
requests get `shutdown_grace_s` to commit) -> end agent streams (held leases go back to
the queue) -> stop the gRPC server -> stop the reaper -> close storage.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Callable, Coroutine
from typing import Any

import grpc
import structlog
from aiohttp import web
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from relay_proto import relay_pb2, relay_pb2_grpc
from relay_server import auth, crypto, keys, reaper, settings, throttle, tls
from relay_server.dispatch import hub as hub_mod
from relay_server.dispatch import servicer as servicer_mod
from relay_server.dispatch import wait_relay
from relay_server.ingress import app as ingress_app
from relay_server.ingress import connections, waiting
from relay_server.store import ephemeral, sql

log = structlog.get_logger(__name__)

SERVICE_NAME = relay_pb2.DESCRIPTOR.services_by_name["AgentRelay"].full_name


class RelayServer:
    def __init__(self, config: settings.ServerSettings, keyring: crypto.KeyRing) -> None:
        self.config = config
        self.store = sql.SqlStore(
            config.database,
            keyring,
            retry_base=config.dispatch.retry,
            payloads=ephemeral.PayloadMemory(config.ingress.ephemeral_max_bytes),
        )
        self.hub = hub_mod.Hub(waiting.Waiting(config.ingress.max_waiting))
        # Refused credentials per source, over webhooks and agent streams alike.
        self.failures = throttle.FailureThrottle(
            max_failures=config.auth_throttle.max_failures,
            window_s=config.auth_throttle.window_s,
        )
        # A rotated key file is picked up within seconds, or at once on SIGHUP.
        self.key_reloader = keys.KeyReloader(self.store, config.key_file)
        self.http_port: int | None = None
        self.grpc_port: int | None = None
        self._stop = asyncio.Event()
        self._started = False

    def stop(self) -> None:
        self._stop.set()

    def reload_keys(self) -> None:
        self.key_reloader.check(force=True)

    async def run(self, on_ready: Callable[[RelayServer], None] | None = None) -> None:
        if self._started:
            raise RuntimeError("RelayServer already started")
        self._started = True
        if self.config.migrate_on_start:
            await self.store.migrate()
        await self.store.open()
        try:
            await self._serve(on_ready)
        finally:
            gc.unfreeze()  # see _serve: what start-up built is collectable again
            await self.store.close()
            log.info("server_stopped")

    async def _serve(self, on_ready: Callable[[RelayServer], None] | None) -> None:
        ingress = self.config.ingress
        https = tls.https_context(ingress.tls_cert, ingress.tls_key)  # bad files: fail first
        housekeeping = [
            reaper.LeaseReaper(self.store, self.config.dispatch.reap_interval_s),
            reaper.RetentionCleaner(self.store, self.config.dispatch.clean_interval_s),
            self.key_reloader,
        ]
        if self.config.dispatch.listen and self.store.db.dialect == "postgresql":
            # Imported here: it needs asyncpg, which a SQLite install (server extra) lacks.
            from relay_server.dispatch import pg_notify

            housekeeping.append(pg_notify.Listener(self.store, self.hub))  # other replicas
        if self.store.db.dialect == "postgresql":  # callers held here, agents elsewhere
            self.hub.replies = wait_relay.ReplyRelay(self.store, self.hub.waiting)
            housekeeping.append(self.hub.replies)
        servicer = servicer_mod.AgentRelayServicer(
            store=self.store,
            hub=self.hub,
            verifier=auth.TokenVerifier(self.store),
            grpc_settings=self.config.grpc,
            dispatch=self.config.dispatch,
            failures=self.failures,
        )
        health = health_async.HealthServicer()
        grpc_server = self._grpc_server(servicer, health)
        app = ingress_app.create_app(
            self.store, self.hub, self.config.ingress, failures=self.failures
        )
        runner = connections.GuardedRunner(  # read deadlines and header limits
            app,
            ingress.read_limits,
            access_log=None,
            shutdown_timeout=ingress.shutdown_grace_s,
        )
        await runner.setup()
        host, port = settings.parse_listen(ingress.listen, "HTTP listen address")
        await web.TCPSite(runner, host, port, ssl_context=https).start()
        self.http_port = int(runner.addresses[0][1])
        await grpc_server.start()
        await health.set("", health_pb2.HealthCheckResponse.SERVING)
        await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        app[ingress_app.GRPC_SERVING][0] = True
        side = asyncio.create_task(
            _run_all([job.run() for job in housekeeping]), name="housekeeping"
        )
        log.info("server_started", http_port=self.http_port, grpc_port=self.grpc_port)
        # Everything start-up built (modules, SQLAlchemy's tables and compiled statements,
        # the apps) lives as long as the server: keep it out of the collector's full
        # scans, which otherwise took ~75 ms each, about once a second under load.
        gc.freeze()
        if on_ready is not None:
            on_ready(self)
        try:
            await self._wait(side)
        finally:
            await self._shutdown(app, runner, servicer, health, grpc_server, housekeeping, side)

    async def _wait(self, side: asyncio.Task[None]) -> None:
        stopper = asyncio.create_task(self._stop.wait(), name="stop-signal")
        try:
            await asyncio.wait({stopper, side}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if side.done() and not side.cancelled() and side.exception() is not None:
            log.error("side_task_failed", task=side.get_name(), exc_info=side.exception())

    async def _shutdown(
        self,
        app: web.Application,
        runner: web.AppRunner,
        servicer: servicer_mod.AgentRelayServicer,
        health: health_async.HealthServicer,
        grpc_server: grpc.aio.Server,
        housekeeping: list[reaper.Periodic],
        side: asyncio.Task[None],
    ) -> None:
        log.info("server_stopping")
        # /readyz and new webhooks turn 503 before anything stops: a load balancer
        # drains us while in-flight requests still commit.
        app[ingress_app.READY][0] = False
        app[ingress_app.GRPC_SERVING][0] = False
        await health.enter_graceful_shutdown()
        self.hub.waiting.close()  # callers held for an answer get their timeout answer now
        await self._drain_ingress(app, runner)
        servicer.stop_sessions()
        await servicer.wait_closed(timeout_s=5.0)
        await grpc_server.stop(grace=2.0)
        for job in housekeeping:
            job.stop()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(side, 5.0)

    async def _drain_ingress(self, app: web.Application, runner: web.AppRunner) -> None:
        """Close the port, let webhooks already inside commit, then close connections."""
        for site in list(runner.sites):
            await site.stop()
        in_flight = app[ingress_app.IN_FLIGHT]
        grace = self.config.ingress.shutdown_grace_s
        if not await in_flight.wait_idle(grace):
            log.warning("ingress_grace_expired", in_flight=in_flight.count, grace_s=grace)
        await runner.cleanup()

    def _grpc_server(
        self, servicer: servicer_mod.AgentRelayServicer, health: health_async.HealthServicer
    ) -> grpc.aio.Server:
        g = self.config.grpc
        max_send = 2 * self.config.ingress.max_body_bytes + self.config.dispatch.max_batch_bytes
        server = grpc.aio.server(
            options=[
                ("grpc.keepalive_time_ms", g.keepalive_time_ms),
                ("grpc.keepalive_timeout_ms", g.keepalive_timeout_ms),
                # grpc-core's own wait for a ping ACK (GRPC_ARG_PING_TIMEOUT_MS) defaults
                # to a minute whatever keepalive_timeout says: align it.
                ("grpc.http2.ping_timeout_ms", g.keepalive_timeout_ms),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", g.min_agent_ping_ms),
                ("grpc.http2.max_pings_without_data", 0),
                ("grpc.max_receive_message_length", g.max_frame_bytes),
                ("grpc.max_send_message_length", max_send),
                ("grpc.so_reuseport", 0),
            ]
        )
        relay_pb2_grpc.add_AgentRelayServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        reflection.enable_server_reflection(
            [
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            server,
        )
        self.grpc_port = self._bind_grpc(server)
        return server

    def _bind_grpc(self, server: grpc.aio.Server) -> int:
        g = self.config.grpc
        if g.tls_cert is None or g.tls_key is None:
            port = server.add_insecure_port(g.listen)
        else:
            client_ca = tls.read_certificate(g.tls_client_ca) if g.tls_client_ca else None
            credentials = grpc.ssl_server_credentials(
                [(tls.read_private_key(g.tls_key), tls.read_certificate(g.tls_cert))],
                root_certificates=client_ca,
                require_client_auth=client_ca is not None,
            )
            port = server.add_secure_port(g.listen, credentials)
        if port == 0:
            raise OSError(f"cannot listen for gRPC on {g.listen}")
        return int(port)


async def _run_all(jobs: list[Coroutine[Any, Any, None]]) -> None:
    await asyncio.gather(*jobs)
