"""The gRPC server: services, health, reflection, start-up loading and graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.sdk.trace import TracerProvider

from vlm.v1 import vlm_service_pb2 as pb
from vlm.v1 import vlm_service_pb2_grpc as pb_grpc
from vlm_service.api.interceptors import (
    AccessLogInterceptor,
    BearerTokenInterceptor,
    ErrorInterceptor,
    MalformedRequestInterceptor,
)
from vlm_service.api.servicer import VisionLanguageServicer
from vlm_service.backends import catalogue
from vlm_service.backends.registry import UnsupportedModel
from vlm_service.config import Settings
from vlm_service.core.engine import Engine
from vlm_service.images.decode import ImageDecoder
from vlm_service.observability.tracing import Tracing, exporter_endpoint, otlp_tracer_provider

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["VisionLanguageService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# The health name that is SERVING for as long as the process runs (loading and draining included): for
# liveness probes, which must not restart a pod that is only busy loading or finishing its streams.
LIVENESS = "liveness"


def model_health_name(model: str) -> str:
    """The health name of one served model: SERVING while that model serves (``vlm.v1.VisionLanguageService/NAME``)."""
    return f"{SERVICE_NAME}/{model}"


# Room above the largest accepted image for the rest of the request.
_MESSAGE_OVERHEAD = 1024 * 1024

#: The exit code of a server that stopped because a model was stuck (its supervisor should restart it).
EXIT_MODEL_STUCK = 3


class StartupError(RuntimeError):
    """The server cannot start (a port cannot be bound); the message is one line for the operator."""


def _exit_now(code: int) -> None:
    """Exit without waiting for threads or running exit handlers: flush the logs and standard streams,
    stop child processes (a checkpoint build), then ``os._exit``."""
    import multiprocessing
    import sys

    for child in multiprocessing.active_children():
        child.terminate()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _in_daemon_thread(function: Callable[[], None], name: str) -> asyncio.Future:
    """Run ``function`` in a daemon thread; the future has its result. Unlike ``asyncio.to_thread`` the
    process never waits for it at exit, so a signal can stop the server while a model loads or builds."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(error: BaseException | None) -> None:  # on the event loop
        if not future.done():
            future.set_exception(error) if error is not None else future.set_result(None)

    def run() -> None:
        error = None
        try:
            function()
        except BaseException as exc:  # handed to the future, which re-raises it where it is awaited
            error = exc
        if not loop.is_closed():
            loop.call_soon_threadsafe(settle, error)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    future.thread = thread
    return future


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """Transport settings: message sizes above the image cap, and keepalive to find vanished clients."""
    return [
        ("grpc.max_receive_message_length", settings.max_image_bytes + _MESSAGE_OVERHEAD),
        ("grpc.max_send_message_length", 4 * 1024 * 1024),
        ("grpc.keepalive_time_ms", int(settings.keepalive_time * 1000)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout * 1000)),
        # grpc-core (1.85) times an unanswered keepalive ping by this ping timeout (60 s by default),
        # not by keepalive_timeout: without it a frozen client whose output still fit in the
        # transport's buffers was never cut (measured). The same bound holds for every ping.
        ("grpc.http2.ping_timeout_ms", int(settings.keepalive_timeout * 1000)),
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

    Health names: ``""`` and ``vlm.v1.VisionLanguageService`` are SERVING while every model serves;
    ``vlm.v1.VisionLanguageService/<model>`` while that model serves (SERVING as soon as it is loaded,
    NOT_SERVING while it loads, after it failed, and from the start of a drain); ``liveness`` is
    SERVING from start-up until the process stops.
    """

    def __init__(self, settings: Settings, tracer_provider: TracerProvider | None = None):
        self.settings = settings
        self.engine = Engine(settings)
        self.health = health.aio.HealthServicer()
        # Tracing: the given provider (tests), else an OTLP exporter when one is configured, else off.
        self._owns_tracer_provider = tracer_provider is None
        provider = tracer_provider or otlp_tracer_provider(settings)
        self.tracing = Tracing(provider) if provider is not None else None
        # Outermost first: the RPC span, the request id and access line, then the checks (the token
        # before anything parses the request's bytes), then the mapping of errors to statuses (so the
        # span and the access line see the final status).
        interceptors: list[grpc.aio.ServerInterceptor] = [
            AccessLogInterceptor(settings.access_log),
            MalformedRequestInterceptor(),
            ErrorInterceptor(),
        ]
        token = settings.bearer_token
        if token:
            interceptors.insert(1, BearerTokenInterceptor(token, settings.reflection_requires_auth))
        if self.tracing is not None:
            interceptors.insert(0, self.tracing.interceptor())
        self._server = grpc.aio.server(interceptors=interceptors, options=server_options(settings))
        self.decoder = ImageDecoder.from_settings(settings)
        servicer = VisionLanguageServicer(self.engine, settings, self.tracing, self.decoder)
        pb_grpc.add_VisionLanguageServiceServicer_to_server(servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        if settings.reflection:
            reflection.enable_server_reflection(
                (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
            )
        self.port = 0
        self._loading: asyncio.Task | None = None
        self._loader: threading.Thread | None = None  # the thread that loads the models
        self._server_loop: asyncio.AbstractEventLoop | None = None
        self.engine.health_listener = self._model_state_changed
        self.engine.stuck_listener = self._model_stuck
        self.stuck_models: list[str] = []
        self.on_stuck: Callable[[], None] | None = None  # set by serve(): start the shutdown
        self._stopped = asyncio.Event()
        self._metrics_http = None

    @classmethod
    async def start(cls, settings: Settings, tracer_provider: TracerProvider | None = None) -> VLMServer:
        server = cls(settings, tracer_provider)
        await server._start()
        return server

    async def _start(self) -> None:
        """Bind every port first (metrics, then gRPC), so that a port in use fails the start with
        nothing left listening; then start serving and load the models in the background."""
        self._server_loop = asyncio.get_running_loop()
        await self.health.set(LIVENESS, SERVING)
        await self._publish_health()
        settings = self.settings
        try:
            if settings.metrics_port:
                try:
                    self._metrics_http, _ = self.engine.metrics.serve(settings.metrics_port, settings.host)
                except OSError as exc:
                    raise StartupError(
                        f"cannot serve metrics on {settings.host}:{settings.metrics_port}: {exc.strerror or exc}"
                    ) from None
            address = f"{settings.host}:{settings.port}"
            credentials = server_credentials(settings)
            try:
                if credentials is None:
                    self.port = self._server.add_insecure_port(address)
                else:
                    self.port = self._server.add_secure_port(address, credentials)
            except RuntimeError:
                self.port = 0
            if not self.port:
                raise StartupError(f"cannot listen on {address}")
            await self._server.start()
        except BaseException:
            self._close_side_services()
            self.engine.close()
            raise
        logger.info("listening on %s:%d; loading models", settings.host, self.port)
        if self.tracing is not None and self._owns_tracer_provider:
            logger.info("tracing: spans go over OTLP to %s", exporter_endpoint(settings))
        if self._metrics_http is not None:
            logger.info("metrics on http://%s:%d/metrics", settings.host, settings.metrics_port)
        self._loading = asyncio.create_task(self._load())

    def _close_side_services(self) -> None:
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None
        self.decoder.close()

    async def _load(self) -> None:
        try:
            loading = _in_daemon_thread(self.engine.load_all, "vlm-loader")
            self._loader = loading.thread
            await loading
        except UnsupportedModel as exc:
            logger.error("cannot serve: %s", exc)
            raise
        except Exception:
            logger.exception("loading models failed; health stays NOT_SERVING")
            raise
        await self._publish_health()
        if self.engine.ready:
            logger.info("serving %s on port %d", ", ".join(self.engine.models), self.port)

    def _model_stuck(self, name: str) -> None:
        """Called from the watchdog thread when a model is stuck: the server drains and exits non-zero."""
        self.stuck_models.append(name)
        loop = self._server_loop
        if self.on_stuck is not None and loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.on_stuck)

    def _model_state_changed(self) -> None:
        """Called from any thread when a model starts or stops serving (loaded, failed, stuck, fatal error)."""
        loop = self._server_loop
        if loop is not None and not loop.is_closed():
            asyncio.run_coroutine_threadsafe(self._publish_health(), loop)

    async def wait_ready(self) -> None:
        """Wait until the models are loaded; raises if loading failed."""
        assert self._loading is not None
        await asyncio.shield(self._loading)

    async def _publish_health(self) -> None:
        """Set every health name but liveness from the engine's state as it is now. Each call reads
        the whole state, so calls that arrive out of order still end on the right statuses."""
        for model in self.engine.models:
            await self.health.set(model_health_name(model), SERVING if self.engine.serves(model) else NOT_SERVING)
        overall = SERVING if self.engine.ready else NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, overall)

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING at once and new generations refused with UNAVAILABLE, while health,
        reflection and ListModels keep answering; in-flight streams get ``grace`` seconds to finish,
        then the server stops and cancels what is left."""
        grace = self.settings.grace_period if grace is None else grace
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        self.engine.start_draining()
        await self._publish_health()
        logger.info("draining (grace period %.1fs)", grace)
        while not self.engine.idle and loop.time() < deadline:
            await asyncio.sleep(0.02)
        await self._server.stop(max(0.0, deadline - loop.time()))
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
            catalogue.stop_builds()  # a first-use build would otherwise hold the exit for minutes
        # Every RPC has ended, so running generations are cancelled and stop within a decode step.
        # A scheduler inside a call that cannot be interrupted (a long prefill) gets 2 s more, no longer.
        await _in_daemon_thread(lambda: self.engine.close(timeout=2.0), "vlm-close")
        self._close_side_services()
        if self.tracing is not None and self._owns_tracer_provider:
            await asyncio.to_thread(self.tracing.shutdown)  # flushes the spans still buffered
        self._stopped.set()
        logger.info("stopped")

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    @property
    def still_loading(self) -> bool:
        """Whether the loading thread still runs (after a stop while models load or build)."""
        return self._loader is not None and self._loader.is_alive()

    @property
    def load_failed(self) -> bool:
        task = self._loading
        return task is not None and task.done() and not task.cancelled() and task.exception() is not None


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then drain and return; a second signal exits at once.

    Exits 1 if a model fails to load, 3 (EXIT_MODEL_STUCK) if a model got stuck, else 0, through
    ``os._exit`` once everything is closed. A signal while models load (or build) stops at once: loading
    runs in a daemon thread that the process does not wait for.
    """
    server = await VLMServer.start(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            logger.warning("second %s: exiting now", signal.Signals(signum).name)
            _exit_now(128 + signum)
        logger.info("%s: shutting down (a second signal exits at once)", signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    server.on_stuck = stop.set
    print(f"vlm-service listening on {settings.host}:{server.port}", flush=True)
    server._loading.add_done_callback(lambda task: task.cancelled() or task.exception() is None or stop.set())
    await stop.wait()
    await server.stop()
    code = 1 if server.load_failed else EXIT_MODEL_STUCK if server.stuck_models else 0
    # Leave without the interpreter's own teardown: it would wait for a thread still inside a model call
    # (a load, a build, a long prefill, a stuck step), abort when that C++ code meets the interpreter's
    # end, or spend seconds collecting the models' garbage (8 s measured), all after "stopped".
    if server.still_loading or server.engine.threads_alive:
        logger.info("a model thread was still busy; exiting without waiting for it")
    _exit_now(code)
