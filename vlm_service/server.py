"""The gRPC server: services, health, reflection, start-up loading and graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.sdk.trace import TracerProvider

from vlm.v1 import vlm_service_pb2 as pb
from vlm.v1 import vlm_service_pb2_grpc as pb_grpc

from .access import AccessLogInterceptor
from .auth import BearerTokenInterceptor
from .config import Settings
from .engine import Engine
from .interceptors import ErrorInterceptor, MalformedRequestInterceptor
from .registry import UnsupportedModel
from .servicer import VisionLanguageServicer
from .tracing import Tracing, exporter_endpoint, otlp_tracer_provider

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["VisionLanguageService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# Room above the largest accepted image for the rest of the request.
_MESSAGE_OVERHEAD = 1024 * 1024


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """Transport settings: message sizes above the image cap, and keepalive to find vanished clients."""
    return [
        ("grpc.max_receive_message_length", settings.max_image_bytes + _MESSAGE_OVERHEAD),
        ("grpc.max_send_message_length", 4 * 1024 * 1024),
        ("grpc.keepalive_time_ms", int(settings.keepalive_time * 1000)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        # Let the server's own pings go out at that pace even while no data flows (a frozen client
        # stops reading, so flow control stops the data).
        ("grpc.http2.min_time_between_pings_ms", int(settings.keepalive_time * 1000)),
        ("grpc.http2.min_ping_interval_without_data_ms", int(settings.keepalive_time * 1000)),
        # Accept client keepalive pings as often as every 5 s, without data in flight.
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS (or mutual TLS with --tls-client-ca) credentials, or None for plaintext."""
    if not settings.tls_cert:
        return None
    with open(settings.tls_key, "rb") as key, open(settings.tls_cert, "rb") as cert:
        pair = (key.read(), cert.read())
    client_ca = None
    if settings.tls_client_ca:
        with open(settings.tls_client_ca, "rb") as ca:
            client_ca = ca.read()
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)


class VLMServer:
    """A running server. ``await VLMServer.start(settings)``, then ``await server.stop()``.

    The port is bound at once and health says NOT_SERVING; models load off the event loop and health
    turns SERVING only when every model is loaded and warmed up (``await server.wait_ready()``).
    """

    def __init__(self, settings: Settings, tracer_provider: TracerProvider | None = None):
        self.settings = settings
        self.engine = Engine(settings)
        self.health = health.aio.HealthServicer()
        # Tracing: the given provider (tests), else an OTLP exporter when one is configured, else off.
        self._owns_tracer_provider = tracer_provider is None
        provider = tracer_provider or otlp_tracer_provider(settings)
        self.tracing = Tracing(provider) if provider is not None else None
        # Outermost first: the RPC span, the request id and access line, then the checks, then the
        # mapping of errors to statuses (so the span and the access line see the final status).
        interceptors: list[grpc.aio.ServerInterceptor] = [
            AccessLogInterceptor(settings.access_log),
            MalformedRequestInterceptor(),
            ErrorInterceptor(),
        ]
        if settings.auth_token:
            interceptors.insert(2, BearerTokenInterceptor(settings.auth_token, settings.reflection_requires_auth))
        if self.tracing is not None:
            interceptors.insert(0, self.tracing.interceptor())
        self._server = grpc.aio.server(interceptors=interceptors, options=server_options(settings))
        servicer = VisionLanguageServicer(self.engine, settings, self.tracing)
        pb_grpc.add_VisionLanguageServiceServicer_to_server(servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        if settings.reflection:
            reflection.enable_server_reflection(
                (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
            )
        self.port = 0
        self._loading: asyncio.Task | None = None
        self._server_loop: asyncio.AbstractEventLoop | None = None
        self.engine.health_listener = self._readiness_dropped
        self._stopped = asyncio.Event()
        self._metrics_http = None

    @classmethod
    async def start(cls, settings: Settings, tracer_provider: TracerProvider | None = None) -> VLMServer:
        server = cls(settings, tracer_provider)
        await server._start()
        return server

    async def _start(self) -> None:
        self._server_loop = asyncio.get_running_loop()
        await self._set_health(NOT_SERVING)
        address = f"{self.settings.host}:{self.settings.port}"
        credentials = server_credentials(self.settings)
        if credentials is None:
            self.port = self._server.add_insecure_port(address)
        else:
            self.port = self._server.add_secure_port(address, credentials)
        if not self.port:
            raise OSError(f"cannot listen on {address}")
        await self._server.start()
        logger.info("listening on %s:%d; loading models", self.settings.host, self.port)
        if self.tracing is not None and self._owns_tracer_provider:
            logger.info("tracing: spans go over OTLP to %s", exporter_endpoint(self.settings))
        if self.settings.metrics_port:
            self._metrics_http, _ = self.engine.metrics.serve(self.settings.metrics_port, self.settings.host)
            logger.info("metrics on http://%s:%d/metrics", self.settings.host, self.settings.metrics_port)
        self._loading = asyncio.create_task(self._load())

    async def _load(self) -> None:
        try:
            await asyncio.to_thread(self.engine.load_all)
        except UnsupportedModel as exc:
            logger.error("cannot serve: %s", exc)
            raise
        except Exception:
            logger.exception("loading models failed; health stays NOT_SERVING")
            raise
        if self.engine.ready:
            await self._set_health(SERVING)
            logger.info("serving %s on port %d", ", ".join(self.engine.models), self.port)

    def _readiness_dropped(self) -> None:
        """Called from a worker thread when a model stops serving (fatal device error)."""
        loop = self._server_loop
        if loop is not None and not loop.is_closed():
            asyncio.run_coroutine_threadsafe(self._set_health(NOT_SERVING), loop)

    async def wait_ready(self) -> None:
        """Wait until the models are loaded; raises if loading failed."""
        assert self._loading is not None
        await asyncio.shield(self._loading)

    async def _set_health(self, status) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING at once and new generations refused with UNAVAILABLE, while health,
        reflection and ListModels keep answering; in-flight streams get ``grace`` seconds to finish,
        then the server stops and cancels what is left."""
        grace = self.settings.grace_period if grace is None else grace
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        self.engine.start_draining()
        await self._set_health(NOT_SERVING)
        logger.info("draining (grace period %.1fs)", grace)
        while not self.engine.idle and loop.time() < deadline:
            await asyncio.sleep(0.02)
        await self._server.stop(max(0.0, deadline - loop.time()))
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
        # Every RPC has ended, so running generations are cancelled and stop within a decode step.
        await asyncio.to_thread(self.engine.close)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        if self.tracing is not None and self._owns_tracer_provider:
            await asyncio.to_thread(self.tracing.shutdown)  # flushes the spans still buffered
        self._stopped.set()
        logger.info("stopped")

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    @property
    def load_failed(self) -> bool:
        task = self._loading
        return task is not None and task.done() and not task.cancelled() and task.exception() is not None


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then drain and return. Exits 1 if a model fails to load."""
    server = await VLMServer.start(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"vlm-service listening on {settings.host}:{server.port}", flush=True)
    server._loading.add_done_callback(lambda task: task.cancelled() or task.exception() is None or stop.set())
    await stop.wait()
    await server.stop()
    if server.load_failed:
        raise SystemExit(1)
