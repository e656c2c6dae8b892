"""The client library's channel behaviour against servers on loopback: the retry policy (what is retried,
what is not, the server's pushback), client-side health checking, the routing header, and the rich
error details. A scripted VisionLanguageService (below) plays the server where a test needs to choose
what each attempt gets; the real server (with the fake model) where the details come from the service."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from tests import fakes
from tests.helpers import ServerThread, png_bytes, shape_image
from vlm.v1 import vlm_service_pb2 as pb
from vlm.v1 import vlm_service_pb2_grpc as pb_grpc
from vlm_client import (
    MODEL_HEADER,
    AsyncVLMClient,
    InvalidArgument,
    Overloaded,
    Unavailable,
    VLMClient,
    VLMError,
)
from vlm_service.config import Settings

IMAGE = png_bytes(shape_image())
BIN = Path(sys.executable).parent


def _status(code: grpc.StatusCode, message: str, *details, pushback_ms: int | None = None):
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    status = rpc_status.to_status(status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=packed))
    metadata = tuple(status.trailing_metadata)
    if pushback_ms is not None:
        metadata += (("grpc-retry-pushback-ms", str(pushback_ms)),)
    return status.code, status.details, metadata


def _retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    delay = duration_pb2.Duration()
    delay.FromMilliseconds(int(seconds * 1000))
    return error_details_pb2.RetryInfo(retry_delay=delay)


class ScriptedService(pb_grpc.VisionLanguageServiceServicer):
    """Each Caption attempt takes the next step of ``script``: ("fail", (code, details, trailers)) aborts
    before any message; ("message-then-fail", ...) sends one message first; "ok" streams a caption.
    Every attempt is recorded with its arrival time and metadata."""

    def __init__(self, script):
        self.script = list(script)
        self.attempts: list[tuple[float, dict[str, str]]] = []

    def Caption(self, request, context):
        self.attempts.append((time.monotonic(), dict(context.invocation_metadata())))
        step = self.script.pop(0) if self.script else "ok"
        if step == "ok":
            yield pb.CaptionResponse(text="A red")
            yield pb.CaptionResponse(text=" circle.")
            yield pb.CaptionResponse(finish_reason=pb.FINISH_REASON_STOP, usage=pb.Usage(completion_tokens=2))
            return
        kind, (code, details, trailers) = step
        if kind == "message-then-fail":
            yield pb.CaptionResponse(text="A red")
        context.abort_with_status(_StatusTuple(code, details, trailers))


class _StatusTuple(grpc.Status):
    def __init__(self, code, details, trailing_metadata):
        self.code, self.details, self.trailing_metadata = code, details, trailing_metadata


class ObservedHealth(health.HealthServicer):
    """grpc.health.v1 that also says when a client started watching it."""

    def __init__(self):
        super().__init__()
        self.watching = threading.Event()

    def Watch(self, request, context, *args, **kwargs):
        self.watching.set()
        return super().Watch(request, context, *args, **kwargs)


@pytest.fixture
def scripted():
    """``scripted(steps, serving=True)`` starts a scripted server on loopback (with grpc.health.v1);
    returns (target, service, health servicer)."""
    servers = []

    def start(script, serving: bool = True):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        service = ScriptedService(script)
        pb_grpc.add_VisionLanguageServiceServicer_to_server(service, server)
        health_servicer = ObservedHealth()
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        health_servicer.set("", status)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}", service, health_servicer

    yield start
    for server in servers:
        server.stop(0)


UNAVAILABLE = ("fail", _status(grpc.StatusCode.UNAVAILABLE, "the server is shutting down"))


@pytest.mark.parametrize("api", ["sync", "async"])
def test_unavailable_before_any_message_is_retried_until_it_succeeds(scripted, api):
    target, service, _ = scripted([UNAVAILABLE, UNAVAILABLE])

    if api == "sync":
        with VLMClient(target, timeout=30) as client:
            stream = client.caption(IMAGE, model="tiny-smolvlm")
            assert stream.result() == "A red circle." and stream.finish_reason == "stop"
    else:

        async def run():
            async with AsyncVLMClient(target, timeout=30) as client:
                stream = client.caption(IMAGE, model="tiny-smolvlm")
                assert await stream.result() == "A red circle." and stream.finish_reason == "stop"

        asyncio.run(run())
    assert len(service.attempts) == 3
    previous = [metadata.get("grpc-previous-rpc-attempts") for _, metadata in service.attempts]
    assert previous == [None, "1", "2"]
    # Every attempt carries the routing header.
    assert [metadata[MODEL_HEADER] for _, metadata in service.attempts] == ["tiny-smolvlm"] * 3


def test_no_routing_header_when_the_request_leaves_the_model_to_the_server(scripted):
    target, service, _ = scripted([])
    with VLMClient(target, timeout=30) as client:
        client.caption(IMAGE).result()
    ((_, metadata),) = service.attempts
    assert MODEL_HEADER not in metadata


def test_unavailable_after_a_message_is_not_retried(scripted):
    target, service, _ = scripted(
        [("message-then-fail", _status(grpc.StatusCode.UNAVAILABLE, "connection lost")), "ok"]
    )
    with VLMClient(target, timeout=30) as client:
        stream = client.caption(IMAGE)
        with pytest.raises(Unavailable, match="connection lost"):
            for _ in stream:
                pass
        assert stream.text == "A red"
    assert len(service.attempts) == 1


def test_the_server_pushback_sets_the_delay_before_the_next_attempt(scripted):
    """With a pushback of 700 ms the second attempt comes no sooner; the policy's own first backoff is
    at most 100 ms, so an ignored pushback shows."""
    refusal = ("fail", _status(grpc.StatusCode.UNAVAILABLE, "loading", _retry_info(0.7), pushback_ms=700))
    target, service, _ = scripted([refusal])
    with VLMClient(target, timeout=30) as client:
        assert client.caption(IMAGE).result() == "A red circle."
    (first, _), (second, _) = service.attempts
    assert second - first >= 0.7


def test_retries_give_up_after_five_attempts_with_the_servers_hint(scripted):
    refusal = ("fail", _status(grpc.StatusCode.UNAVAILABLE, "loading", _retry_info(0.05), pushback_ms=50))
    target, service, _ = scripted([refusal] * 6)
    with VLMClient(target, timeout=30) as client, pytest.raises(Unavailable) as info:
        client.caption(IMAGE).result()
    assert len(service.attempts) == 5
    assert info.value.retry_after == pytest.approx(0.05)


@pytest.mark.parametrize("api", ["sync", "async"])
def test_rich_details_reach_the_error_and_other_codes_are_not_retried(scripted, api):
    bad = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field="options.top_p", description="must be in (0, 1]"),
            error_details_pb2.BadRequest.FieldViolation(field="image.data", description="is empty"),
        ]
    )
    target, service, _ = scripted(
        [
            ("fail", _status(grpc.StatusCode.INVALID_ARGUMENT, "options.top_p: must be in (0, 1]", bad)),
            ("fail", _status(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", _retry_info(2.5), pushback_ms=2500)),
        ]
    )

    invalid, overloaded = _two_errors(target, api)
    assert isinstance(invalid, InvalidArgument) and invalid.retry_after is None
    assert [(v.field, v.description) for v in invalid.field_violations] == [
        ("options.top_p", "must be in (0, 1]"),
        ("image.data", "is empty"),
    ]
    assert isinstance(overloaded, Overloaded) and overloaded.retry_after == 2.5 and not overloaded.field_violations
    assert len(service.attempts) == 2  # one each: INVALID_ARGUMENT and RESOURCE_EXHAUSTED are not retried


def _two_errors(target: str, api: str) -> list[VLMError]:
    """Two captions from fresh clients of ``api``; the errors they raised."""
    if api == "sync":
        errors = []
        for _ in range(2):
            with VLMClient(target, timeout=30) as client, pytest.raises(VLMError) as info:
                client.caption(IMAGE).result()
            errors.append(info.value)
        return errors

    async def run():
        errors = []
        for _ in range(2):
            async with AsyncVLMClient(target, timeout=30) as client:
                with pytest.raises(VLMError) as info:
                    await client.caption(IMAGE).result()
            errors.append(info.value)
        return errors

    return asyncio.run(run())


def test_wait_for_ready_calls_go_only_to_a_server_whose_health_says_serving(scripted):
    """Client-side health checking (health_check=True): the channel watches grpc.health.v1 and picks no
    server that reports NOT_SERVING (loading, draining); a wait-for-ready call waits for SERVING."""
    target, service, health_servicer = scripted([], serving=False)
    result = {}

    def call():
        with VLMClient(target, timeout=30, wait_for_ready=True, health_check=True) as client:
            result["text"] = client.caption(IMAGE).result()

    caller = threading.Thread(target=call)
    caller.start()
    assert health_servicer.watching.wait(10), "the channel never watched the server's health"
    serving_at = time.monotonic()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    caller.join(30)
    assert result == {"text": "A red circle."}
    ((arrived, _),) = service.attempts
    assert arrived > serving_at, "the call reached the server while its health said NOT_SERVING"


@pytest.fixture
def fake_server(tmp_path, cache_dir):
    fakes.FakeBackend.reset()
    servers = []

    def start(**settings):
        server = ServerThread(Settings(models=[f"fake={fakes.register(tmp_path)}"], cache_dir=cache_dir, **settings))
        server.wait_ready()
        servers.append(server)
        return server

    yield start
    fakes.FakeBackend.step_gate = None
    for server in servers:
        server.stop()
    fakes.FakeBackend.reset()


def test_the_real_servers_field_violations_and_retry_hint_reach_the_error(fake_server):
    server = fake_server(max_streams=1)
    with VLMClient(server.target, timeout=30) as client:
        with pytest.raises(InvalidArgument) as info:
            client.caption(IMAGE, top_p=3.0).result()
        (violation,) = info.value.field_violations
        assert violation.field == "options.top_p" and violation.description
        gate = threading.Event()
        fakes.FakeBackend.step_gate = gate  # the next stream holds the only slot
        try:
            held = iter(client.caption(IMAGE))
            server.call(_wait_for_open_streams(server, 1))
            with pytest.raises(Overloaded) as info:
                client.caption(IMAGE).result()
            assert info.value.retry_after is not None and info.value.retry_after > 0
        finally:
            gate.set()
        assert "".join(held) == "Hello, world."


async def _wait_for_open_streams(server, count: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while server.engine.open_streams < count:
        assert time.monotonic() < deadline, "the stream never opened"
        await asyncio.sleep(0.005)


TOKEN = "cli-s3cret-token"


def _cli(*args, env=None):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("VLM_")}
    return subprocess.run(
        [str(BIN / "vlm-client"), *args], capture_output=True, text=True, timeout=120, env={**environ, **(env or {})}
    )


def test_cli_token_file_and_environment_against_a_server_with_a_token(fake_server, tmp_path):
    server = fake_server(auth_token=TOKEN)
    image = tmp_path / "red.png"
    image.write_bytes(IMAGE)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    wrong_file = tmp_path / "wrong"
    wrong_file.write_text("not-the-token")
    target = ["--server", server.target]
    token = ["--token-file", str(token_file)]
    # Connection options after the subcommand (as people type them) and before it.
    for argv in (["caption", str(image), *target, *token], [*target, *token, "caption", str(image)]):
        result = _cli(*argv)
        assert (result.returncode, result.stdout) == (0, "Hello, world.\n"), result.stderr
    result = _cli("models", *target, env={"VLM_TOKEN": TOKEN})
    assert result.returncode == 0 and result.stdout.startswith("fake\tfake\tdefault ready"), result.stderr
    result = _cli("models", *target, env={"VLM_TOKEN_FILE": str(token_file)})
    assert result.returncode == 0, result.stderr
    for argv, env in (([], {}), (["--token-file", str(wrong_file)], {"VLM_TOKEN": TOKEN})):
        result = _cli("caption", str(image), *target, *argv, env=env)
        assert result.returncode == 1 and result.stderr.startswith("vlm-client: UNAUTHENTICATED")
        assert TOKEN not in result.stderr and "Traceback" not in result.stderr
    result = _cli("caption", str(image), *target, "--token-file", str(tmp_path / "missing"))
    assert result.returncode == 2 and "cannot read the token file" in result.stderr


def test_the_real_servers_loading_refusal_is_retried_after_its_pushback(tmp_path, cache_dir):
    """The real server refuses a call while its model loads with UNAVAILABLE before any response
    header (so the call is not committed) and a 1 s RetryInfo + pushback; the client's policy retries
    it after that delay and the call succeeds once the model is ready (the default client: no
    health checking, so the call reaches the loading server)."""
    fakes.FakeBackend.reset()
    fakes.FakeBackend.load_gate = threading.Event()
    server = ServerThread(Settings(models=[f"fake={fakes.register(tmp_path)}"], cache_dir=cache_dir))
    submissions: list[tuple[float, str]] = []
    submit = server.engine.submit

    def recording_submit(request, **kwargs):
        try:
            job = submit(request, **kwargs)
        except Exception as error:
            submissions.append((time.monotonic(), type(error).__name__))
            fakes.FakeBackend.load_gate.set()  # the model finishes loading after the first refusal
            raise
        submissions.append((time.monotonic(), "accepted"))
        return job

    server.engine.submit = recording_submit
    try:
        with VLMClient(server.target, timeout=60) as client:
            assert client.caption(IMAGE).result() == "Hello, world."
    finally:
        fakes.FakeBackend.load_gate.set()
        server.stop()
        fakes.FakeBackend.reset()
    (refused_at, refusal), *_, (accepted_at, outcome) = submissions
    assert (refusal, outcome) == ("ModelNotReady", "accepted")
    assert accepted_at - refused_at >= 1.0  # the server's pushback, not the policy's 0.1 s backoff
