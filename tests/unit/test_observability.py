"""The pieces of observability that need no server: when tracing turns on, which request ids are
accepted, and what a log record looks like in each format."""

from __future__ import annotations

import io
import json
import logging

import pytest
from opentelemetry.sdk.trace import TracerProvider

from vlm_service.api.interceptors import AccessLogInterceptor
from vlm_service.config import Settings
from vlm_service.observability import access, logs
from vlm_service.observability.tracing import exporter_endpoint, otlp_tracer_provider


def test_tracing_is_off_unless_an_endpoint_is_given(monkeypatch):
    for name in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    assert exporter_endpoint(Settings()) == ""
    assert otlp_tracer_provider(Settings()) is None

    flag = Settings(otlp_endpoint="http://collector:4317")
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://generic:4317"}
    assert exporter_endpoint(flag, environ) == "http://collector:4317", "the flag wins"
    assert exporter_endpoint(Settings(), environ) == "http://generic:4317"
    environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = "http://traces:4317"
    assert exporter_endpoint(Settings(), environ) == "http://traces:4317", "the traces-only variable first"
    assert exporter_endpoint(flag, {**environ, "OTEL_SDK_DISABLED": "true"}) == ""

    provider = otlp_tracer_provider(flag)
    try:
        assert isinstance(provider, TracerProvider)
        assert provider.resource.attributes["service.name"] == "vlm-service"
    finally:
        provider.shutdown()


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("abc-123", True),
        ("0af76519-16cd-43dd-8448-eb211c80319c", True),
        ("svc.gateway:42_x", True),
        ("x" * 128, True),
        ("x" * 129, False),
        ("", False),
        ("two words", False),
        ("new\nline", False),
        ('quote"d', False),
        ("ünïcode", False),
        (b"binary", False),
        (None, False),
    ],
)
def test_request_ids_are_short_and_plain(sent, kept):
    assert access.valid_request_id(sent) == (sent if kept else None)


def _log_through(log_format: str, call: access.Call | None) -> str:
    stream = io.StringIO()
    logger = logging.getLogger("tests.observability")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = logs.handler(log_format, stream)
    logger.addHandler(handler)
    token = access._current.set(call)
    try:
        logger.info("hello %s", "world")
        logger.info("from a worker", extra={"request_id": "given-id"})
    finally:
        access._current.reset(token)
        logger.removeHandler(handler)
    return stream.getvalue()


def test_json_records_carry_the_calls_request_id():
    call = access.Call("/vlm.v1.VisionLanguageService/Caption", "call-id", "ipv4:127.0.0.1:1", 0.0)
    first, second = (json.loads(line) for line in _log_through("json", call).splitlines())
    assert first["message"] == "hello world" and first["level"] == "INFO"
    assert first["logger"] == "tests.observability" and first["request_id"] == "call-id"
    assert first["time"].endswith("+00:00")
    assert second["request_id"] == "given-id", "an id given by the caller of the logger wins"
    outside = json.loads(_log_through("json", None).splitlines()[0])
    assert "request_id" not in outside


def test_text_records_show_the_request_id_in_brackets():
    call = access.Call("/vlm.v1.VisionLanguageService/Caption", "call-id", "", 0.0)
    first, second = _log_through("text", call).splitlines()
    assert first.endswith("INFO tests.observability [call-id]: hello world")
    assert second.endswith("[given-id]: from a worker")
    assert _log_through("text", None).splitlines()[0].endswith("INFO tests.observability: hello world")


class _StreamContext:
    """What the access interceptor reads of a grpc.aio context, and its done callbacks."""

    def __init__(self):
        self.done_callbacks = []

    def add_done_callback(self, callback):
        self.done_callbacks.append(callback)

    def peer(self):
        return "ipv4:127.0.0.1:1"

    def time_remaining(self):
        return None

    def code(self):
        return None


async def test_a_stream_cancelled_mid_write_gets_one_access_line_when_it_ends(caplog):
    """grpc leaves a stream that it cancels while writing suspended at its ``yield`` and runs the
    RPC's done callbacks: the access line (CANCELLED) is written then, and not again when the
    suspended generator is collected."""
    import grpc

    async def handler(request, context):
        for piece in ("a", "b", "c"):
            yield piece

    method = "/vlm.v1.VisionLanguageService/Caption"

    async def continuation(details):
        return grpc.unary_stream_rpc_method_handler(handler)

    details = type("Details", (), {"method": method, "invocation_metadata": ()})()
    wrapped = await AccessLogInterceptor().intercept_service(continuation, details)
    context = _StreamContext()
    caplog.set_level(logging.INFO, logger="vlm_service.access")
    stream = wrapped.unary_stream(object(), context)
    assert await anext(stream) == "a"  # suspended at its yield, as grpc leaves it
    for callback in context.done_callbacks:  # the RPC ends
        callback(context)
    lines = [record.getMessage() for record in caplog.records if record.name == "vlm_service.access"]
    assert len(lines) == 1 and lines[0].startswith(f"{method} CANCELLED")
    await stream.aclose()  # collected at last
    lines = [record.getMessage() for record in caplog.records if record.name == "vlm_service.access"]
    assert len(lines) == 1
