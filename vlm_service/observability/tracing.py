"""OpenTelemetry tracing of the RPCs, off by default.

When on (``--otlp-endpoint``, or the SDK's own ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``):

* every RPC but health checks gets a server span from opentelemetry-instrumentation-grpc's grpc.aio
  interceptor, which continues the caller's trace from its W3C ``traceparent`` header (the global
  propagator: tracecontext and baggage unless ``OTEL_PROPAGATORS`` says otherwise);
* each generation adds three child spans, made in the model's scheduler thread where the work happens:
  ``queue`` (arrival to the start of its generation), ``prefill`` (until it has joined its model's
  batch: the prompt processed and the first token out) and ``decode`` (to the end). The RPC handler captures its span's context in a :class:`GenerationTrace`, which
  travels with the job; the scheduler stamps it at each phase, and the spans carry those times.

Spans go to an OTLP/gRPC exporter through a batch processor (off the request path). Each server has
its own tracer provider (tests give one with an in-memory exporter). When tracing is off there is no
interceptor and no trace object: the hot path does nothing, and there is never a span per token.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from importlib import metadata

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from vlm_service.config import Settings
from vlm_service.types import FinishReason

_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def _version() -> str:
    try:
        return metadata.version("vlm-service")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0"


def exporter_endpoint(settings: Settings, environ: Mapping[str, str] | None = None) -> str:
    """Where spans go: ``--otlp-endpoint``, else the SDK's standard variables; "" is tracing off
    (so is ``OTEL_SDK_DISABLED=true``)."""
    environ = os.environ if environ is None else environ
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return ""
    if settings.otlp_endpoint:
        return settings.otlp_endpoint
    return next((environ[name] for name in _ENDPOINT_VARIABLES if environ.get(name, "").strip()), "")


def otlp_tracer_provider(settings: Settings) -> TracerProvider | None:
    """A tracer provider that exports over OTLP/gRPC, or None when tracing is off.

    The exporter reads the SDK's other variables itself (``OTEL_EXPORTER_OTLP_HEADERS``, ``..._INSECURE``,
    ``..._CERTIFICATE``, ``..._TIMEOUT``); the provider reads ``OTEL_TRACES_SAMPLER[_ARG]`` and the
    resource ``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES``.
    """
    endpoint = exporter_endpoint(settings)
    if not endpoint:
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    attributes = {"service.version": _version()}
    if not os.environ.get("OTEL_SERVICE_NAME"):
        attributes["service.name"] = "vlm-service"
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return provider


class Tracing:
    """One server's tracing: the RPC interceptor and the generation traces, from one provider."""

    def __init__(self, provider: TracerProvider):
        self.provider = provider
        self.tracer = provider.get_tracer("vlm_service", _version())

    def interceptor(self) -> grpc.aio.ServerInterceptor:
        """The RPC span of every call but health checks (orchestrators probe every few seconds)."""
        return aio_server_interceptor(tracer_provider=self.provider, filter_=filters.negate(filters.health_check()))

    def generation(self, model: str, request_id: str, arrival: float) -> GenerationTrace:
        """The trace of one generation, parented on the current span (the RPC's)."""
        return GenerationTrace(self.tracer, otel_context.get_current(), model, request_id, arrival)

    def shutdown(self) -> None:
        """Flush what is buffered and stop exporting."""
        self.provider.shutdown()


def _clock_offset_ns() -> int:
    """Wall-clock minus monotonic time, in nanoseconds: of three readings, the one whose monotonic
    bracket is the shortest (a thread preempted mid-reading would skew it)."""
    best = (1 << 62, 0)
    for _ in range(3):
        before = time.monotonic_ns()
        wall = time.time_ns()
        after = time.monotonic_ns()
        best = min(best, (after - before, wall - (before + after) // 2))
    return best[1]


class GenerationTrace:
    """The ``queue``, ``prefill`` and ``decode`` spans of one generation.

    Called from the scheduler thread, once per phase: :meth:`started`, :meth:`first_token`, :meth:`ended`
    (a generation that fails or is cancelled may skip a phase; :meth:`ended` closes whatever is open).
    """

    __slots__ = ("_tracer", "_parent", "_attributes", "_arrival", "_open", "_offset")

    def __init__(self, tracer: trace.Tracer, parent: otel_context.Context, model: str, request_id: str, arrival):
        self._tracer = tracer
        self._parent = parent
        self._attributes = {"vlm.model": model, "vlm.request_id": request_id}
        self._arrival = arrival
        self._open: Span | None = None
        # One clock offset for the whole trace: its phases keep their monotonic order exactly.
        self._offset = _clock_offset_ns()

    def _ns(self, monotonic: float) -> int:
        """A ``time.monotonic()`` instant as the wall-clock nanoseconds spans carry."""
        return int(monotonic * 1e9) + self._offset

    def _span(self, name: str, start: float) -> Span:
        return self._tracer.start_span(
            name, context=self._parent, kind=SpanKind.INTERNAL, attributes=self._attributes, start_time=self._ns(start)
        )

    def started(self, at: float) -> None:
        """The generation starts at ``at`` (monotonic): the queue span closes and the prefill opens."""
        self._span("queue", self._arrival).end(self._ns(at))
        self._open = self._span("prefill", at)

    def expired(self, at: float, error: BaseException) -> None:
        """The deadline passed at ``at`` while the request was queued: the queue span ends with the error
        and no other phase opens."""
        span = self._span("queue", self._arrival)
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        span.end(self._ns(at))

    def first_token(self, at: float) -> None:
        """The prompt is processed and the first token chosen: the decode phase opens."""
        if self._open is not None:
            self._open.end(self._ns(at))
        self._open = self._span("decode", at)

    def ended(
        self,
        at: float,
        reason: FinishReason | None = None,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        error: BaseException | None = None,
    ) -> None:
        """The generation ended: finished with ``reason``, failed with ``error``, or (neither) stopped
        because its RPC ended."""
        span, self._open = self._open, None
        if span is None:
            return
        span.set_attribute("gen_ai.usage.input_tokens", prompt_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", completion_tokens)
        if error is not None:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        elif reason is not None:
            span.set_attribute("gen_ai.response.finish_reasons", [reason.value])
        else:
            span.set_attribute("vlm.cancelled", True)
        span.end(self._ns(at))
