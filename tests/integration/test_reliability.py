"""The fault matrix, row by row, against real servers on loopback (a fake model keeps them fast and
steerable; a real one where the row is about the model)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests import fakes
from tests.helpers import (
    ServerThread,
    StepGate,
    caption_request,
    png_bytes,
    sample,
    shape_image,
    wait_for,
    wait_idle,
)
from vlm.v1 import vlm_service_pb2 as pb
from vlm_service.config import Settings
from vlm_service.core import job as job_module


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    return info.value


def retry_delay_ms(error: grpc.RpcError) -> int:
    """The RetryInfo delay in an error's rich status details."""
    details = dict(error.trailing_metadata())["grpc-status-details-bin"]
    retry = error_details_pb2.RetryInfo()
    assert any(d.Unpack(retry) for d in status_pb2.Status.FromString(details).details), "no RetryInfo"
    return retry.retry_delay.ToMilliseconds()


def list_services(channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    return [service.name for reply in replies for service in reply.list_services_response.service]


def health_status(channel, timeout=2.0):
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout).status


def test_out_of_memory_is_resource_exhausted_and_the_next_request_works(fake):
    server = fake()
    with server.channel() as channel:
        stub = server.stub(channel)
        fakes.FakeBackend.fail_next = MemoryError()
        error = rpc_error(stub.Caption(caption_request()))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "out of memory" in error.details()
        assert retry_delay_ms(error) >= 1000, "out of memory carries a RetryInfo hint"
        assert list(stub.Caption(caption_request()))[-1].finish_reason == pb.FINISH_REASON_STOP
        assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING


def test_fatal_device_error_flips_health_to_not_serving(fake):
    server = fake()
    with server.channel() as channel:
        stub = server.stub(channel)
        fakes.FakeBackend.fail_next = RuntimeError("CUDA error: an illegal memory access was encountered")
        error = rpc_error(stub.Caption(caption_request()))
        assert error.code() == grpc.StatusCode.INTERNAL and "CUDA" not in error.details()
        deadline = time.monotonic() + 5
        while health_status(channel) != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline, "health still SERVING after a fatal device error"
            time.sleep(0.01)
        error = rpc_error(stub.Caption(caption_request()))
        assert error.code() == grpc.StatusCode.UNAVAILABLE and "no longer serves" in error.details()
        assert not stub.ListModels(pb.ListModelsRequest()).models[0].ready


def test_stalled_generation_is_aborted(fake):
    server = fake(stall_timeout=0.5)
    fakes.FakeBackend.step_gate = threading.Event()  # the model hangs before its first step
    with server.channel() as channel:
        # The watchdog's ABORTED, not the client's 20 s deadline (DEADLINE_EXCEEDED), ends it.
        error = rpc_error(server.stub(channel).Caption(caption_request(), timeout=20))
    fakes.FakeBackend.step_gate.set()
    assert error.code() == grpc.StatusCode.ABORTED and "stalled" in error.details()


def test_a_deadline_that_the_queue_cannot_meet_is_refused_at_once(fake):
    server = fake(max_queue=8)
    fakes.FakeBackend.step_delay = 0.1  # 5 steps: about 0.5 s a request
    with server.channel() as channel:
        stub = server.stub(channel)
        list(stub.Caption(caption_request()))  # the server learns how long a request takes
        running = [stub.Caption(caption_request()) for _ in range(3)]
        for call in running:
            call.initial_metadata()
        error = rpc_error(stub.Caption(caption_request(), timeout=0.6))
        # Refused at admission ("cannot be met"), not expired at its deadline (grpc's own "Deadline
        # Exceeded", or the queue's "the deadline passed after ... in the queue"): it never queued.
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "cannot be met" in error.details()
        assert all(list(call)[-1].finish_reason == pb.FINISH_REASON_STOP for call in running)
        # With time enough, the same request is accepted.
        assert list(stub.Caption(caption_request(), timeout=30))[-1].finish_reason == pb.FINISH_REASON_STOP


def test_a_deadline_that_passes_in_the_queue_ends_it_counted_and_traced_once(tmp_path, cache_dir):
    """A request queued behind a long one whose deadline passes before its turn ends with
    DEADLINE_EXCEEDED, is counted once in ``vlm_queue_expired`` and has a queue span that ends in an error
    (it never gets a prefill or decode span)."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.trace import SpanKind, StatusCode

    from tests.integration.test_observability import RecordedSpans

    fakes.FakeBackend.reset()
    spans, provider = RecordedSpans(), TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    checkpoint = fakes.register(tmp_path)
    server = ServerThread(Settings(models=[f"fake={checkpoint}"], cache_dir=cache_dir), tracer_provider=provider)
    try:
        server.wait_ready()
        fakes.FakeBackend.pieces = ["x"] * 2000
        fakes.FakeBackend.step_delay = 0.01
        with server.channel() as channel:
            stub = server.stub(channel)
            running = stub.Caption(caption_request(max_new_tokens=2000))
            next(running)  # it holds the fake's one slot for about 20 s
            metadata = (("x-request-id", "expires-in-queue"),)
            # 3 s: long enough to be decoded and queued on a loaded machine, far short of the running one's
            # 20 s. (grpc ended such an RPC 6 ms before the deadline the servicer computed: scheduler.py's
            # DEADLINE_SLACK; without it this request was taken for a plain cancel.)
            error = rpc_error(stub.Caption(caption_request(max_new_tokens=2), timeout=3, metadata=metadata))
            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            running.cancel()
            wait_idle(server.engine)

        def expired(found):
            return [s for s in found if s.attributes.get("vlm.request_id") == "expires-in-queue" and s.name == "queue"]

        (queue,) = expired(spans.wait_for(expired))
        assert queue.status.status_code is StatusCode.ERROR and queue.status.description == "DeadlineExpired"
        mine = [s for s in spans.get_finished_spans() if s.attributes.get("vlm.request_id") == "expires-in-queue"]
        assert {s.name for s in mine if s.kind is SpanKind.INTERNAL} == {"queue"}  # no prefill, no decode
        assert sample(server.engine, "vlm_queue_expired_total", model="fake") == 1
    finally:
        server.stop()
        provider.shutdown()
        fakes.FakeBackend.reset()


def test_a_cancelled_request_still_running_is_not_counted_in_the_wait_estimate(fake):
    """The estimate behind refusing unmeetable deadlines counts only the requests that will still run:
    one whose RPC ended stops at its next step, however long it was."""
    server = fake()
    fakes.FakeBackend.pieces = ["x"] * 2000
    scheduler = server.engine.models["fake"].scheduler
    with StepGate(scheduler) as gate, server.channel() as channel:
        stub = server.stub(channel)
        call = stub.Caption(caption_request(max_new_tokens=2000))
        gate.close()
        job = gate.wait_held()
        scheduler.seconds_per_request = 10.0
        assert scheduler.estimated_wait() == 10.0  # the running request is ahead of a new one
        call.cancel()
        wait_for(lambda: job.cancelled, timeout=10, message="the cancel never reached the job")
        assert scheduler.estimated_wait() == 0.0
        # A new request is admitted and answered once the cancelled one has stopped.
        gate.open()
        assert list(stub.Caption(caption_request(max_new_tokens=3), timeout=30))[-1].usage.completion_tokens == 3


def test_two_moondream_models_sampling_at_once_never_trip_the_watchdog(cache_dir):
    """Moondream's remote code samples from torch's global generator, so a sampled generation holds a
    process-wide lock for its whole answer, and a second Moondream model's sampled request waits for it.
    That wait is a sign of life, not a stuck model: with a 1 s stall timeout, the second request waits
    about 4 s (the first one's steps paced to 40 ms) and both answer; the models stay SERVING."""
    from vlm_checkpoints.tiny_moondream import ensure_tiny_moondream

    noise = ensure_tiny_moondream(cache_dir, trained=False)
    server = ServerThread(
        Settings(models=[f"first={noise}", f"second={noise}"], cache_dir=cache_dir, stall_timeout=1.0, grace_period=0.0)
    )
    try:
        server.wait_ready()
        first = server.engine.models["first"].scheduler
        first.step_gate = lambda job: time.sleep(0.04)
        sampled = {"temperature": 0.1, "seed": 7, "max_new_tokens": 100}
        with server.channel() as channel:
            stub = server.stub(channel)
            one = stub.Caption(caption_request(model="first", **sampled), timeout=120)
            first_messages = [next(one)]  # it samples: it holds the lock now
            started = time.monotonic()
            two = list(stub.Caption(caption_request(model="second", **sampled), timeout=120))
            waited = time.monotonic() - started
            first_messages += list(one)
        usage = first_messages[-1].usage
        assert usage.completion_tokens * 0.04 >= 2.0, "the first answer was too short to test the wait"
        assert waited >= 2.0, f"the second request did not wait for the first ({waited:.1f} s)"
        assert two[-1].finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
        assert all(
            served.scheduler is not None and not served.scheduler.stuck for served in server.engine.models.values()
        )
        assert server.engine.ready
    finally:
        server.stop()


def test_cancel_before_the_first_token_never_runs_a_step(fake):
    """The generation has started and waits at its first stop check (the scheduler's step gate, closed):
    the RPC is cancelled there, and once the server has stopped the job, no step runs."""
    server = fake()
    backend = fakes.FakeBackend.instances[-1]
    steps_before = backend.steps  # the warm-up's
    with StepGate(server.engine.models["fake"].scheduler, closed=True) as gate, server.channel() as channel:
        call = server.stub(channel).Caption(caption_request())
        job = gate.wait_held()  # started, before its first step
        call.cancel()
        wait_for(lambda: job.cancelled, message="the server never stopped the job")
        gate.open()
        wait_idle(server.engine)
    assert backend.started == [job.request.request_id]
    assert backend.steps == steps_before


# Bytes that are not a valid message of the method's request type: a truncated varint field, a length
# past the end, a wire type 7 (which does not exist), invalid UTF-8 in a string field (`model`; an
# unknown field of the empty ListModelsRequest, so valid there).
MALFORMED = [b"\xff\xff\xff\x0f not protobuf", b"\x0a\xff", b"\x12\x20short", b"\x0f\x01", b"\x0a\x02\xc3\x28"]


@pytest.mark.parametrize("method", ["Caption", "Query", "ListModels"])
def test_malformed_request_bytes_are_invalid_argument(fake, method):
    server = fake()
    with server.channel() as channel:
        path = f"/vlm.v1.VisionLanguageService/{method}"
        raw = channel.unary_unary(path) if method == "ListModels" else channel.unary_stream(path)
        for data in MALFORMED[:-1] if method == "ListModels" else MALFORMED:
            with pytest.raises(grpc.RpcError) as info:
                reply = raw(data, timeout=5)
                if method != "ListModels":
                    list(reply)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (data, info.value.details())
            assert info.value.details() == "the request is not a valid message"
        stub = server.stub(channel)
        assert list(stub.Caption(caption_request()))[-1].finish_reason == pb.FINISH_REASON_STOP


def test_unknown_enum_values_name_the_field(fake):
    server = fake()
    with server.channel() as channel:
        stub = server.stub(channel)
        error = rpc_error(stub.Caption(caption_request(length=99)))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "length" in error.details()


def test_image_byte_cap_and_transport_limit(fake):
    server = fake(max_image_bytes=50_000)
    big = os.urandom(60_000)  # over the image cap, under the transport limit (cap + 1 MiB)
    huge = os.urandom(2 * 1024 * 1024)  # over the transport limit
    with server.channel() as channel:
        stub = server.stub(channel)
        error = rpc_error(stub.Caption(caption_request(big)))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit is 50000" in error.details()
        assert rpc_error(stub.Caption(caption_request(huge))).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert list(stub.Caption(caption_request()))[-1].finish_reason == pb.FINISH_REASON_STOP


def test_health_list_models_and_reflection_answer_under_a_flood_of_streams(cache_dir, noise_dir):
    """64 concurrent streams on a real model: health, ListModels and reflection are never queued behind
    generation. They are probed while the flood runs (their latencies are printed, not asserted: a
    latency is a benchmark's claim), then with generation frozen in the middle of a decode step (the scheduler held at its step gate):
    anything that waited for generation would not answer then."""
    server = ServerThread(
        Settings(models=[f"noise={noise_dir}"], cache_dir=cache_dir, max_queue=64, max_streams=64, grace_period=0)
    )
    server.wait_ready()
    try:
        with server.channel() as channel, server.channel() as probe:
            stub = server.stub(channel)
            calls = [stub.Caption(caption_request(max_new_tokens=2000)) for _ in range(64)]  # outlasts the probes
            calls[0].initial_metadata()
            probes = {
                "health": lambda: health_status(probe) == health_pb2.HealthCheckResponse.SERVING,
                "ListModels": lambda: server.stub(probe).ListModels(pb.ListModelsRequest(), timeout=2).models[0].ready,
                "reflection": lambda: "vlm.v1.VisionLanguageService" in list_services(probe),
            }
            latencies: dict[str, list[float]] = {name: [] for name in probes}
            for _ in range(20):
                for name, answers in probes.items():
                    started = time.monotonic()
                    assert answers(), name
                    latencies[name].append(time.monotonic() - started)
                time.sleep(0.02)
            assert server.engine.open_streams == 64, "the flood should still be running while health is probed"
            with StepGate(server.engine.models["noise"].scheduler, closed=True) as gate:
                gate.wait_held()
                for name, answers in probes.items():
                    assert answers(), f"{name} did not answer while generation was held"
            for call in calls:
                call.cancel()
        for name, values in latencies.items():
            values.sort()
            print(f"{name} under 64 streams: median {values[10] * 1000:.1f} ms, max {values[-1] * 1000:.1f} ms")
        wait_idle(server.engine)
    finally:
        server.stop()


CLIENT = textwrap.dedent(
    """
    import sys
    from vlm_client import VLMClient
    with VLMClient(sys.argv[1]) as client:
        for text in client.caption(sys.argv[2], max_new_tokens=int(sys.argv[3])):
            print(text, flush=True)
    """
)


def frozen_client(target: str, image: Path, max_new_tokens: int) -> subprocess.Popen:
    """A client process that reads the first text of a Caption, then is frozen with SIGSTOP: no FIN,
    no reads, no answers to the server's pings. The caller kills it."""
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT, target, str(image), str(max_new_tokens)], stdout=subprocess.PIPE
    )
    assert client.stdout.readline()  # streaming
    client.send_signal(signal.SIGSTOP)
    return client


@pytest.mark.parametrize(
    ("keepalive", "piece"),
    [(0.5, "x"), (0.5, "x" * 200), (60.0, "x")],
    ids=["short-keepalive-small-output", "short-keepalive-large-output", "control-long-keepalive"],
)
def test_a_client_that_stops_reading_has_its_generation_stopped(fake, tmp_path, keepalive, piece, monkeypatch):
    """A frozen client does not hold the model: the server's keepalive ping goes unanswered, the
    connection is dropped, which cancels the RPC and stops the generation. With 1-character pieces the
    whole answer fits in the transport's buffers, so the server's writes never block: only the ping
    can find it (grpc-core timed that ping by its 60 s ping timeout until the server set it to the
    keepalive timeout; the small-output case ran all 2,000 steps then). The control run with a long
    keepalive shows that keepalive is what finds it. The server's second line of defence (a backlog
    of unread output stops the generation after keepalive time + timeout) is given a limit no stream
    reaches here, so it cannot be what stops it."""
    monkeypatch.setattr(job_module, "_BACKLOG", 10**9)
    server = fake(keepalive_time=keepalive, keepalive_timeout=keepalive)
    fakes.FakeBackend.pieces = [piece] * 2000
    fakes.FakeBackend.step_delay = 0.005  # 10 s of generation if nobody stops it
    backend = fakes.FakeBackend.instances[-1]
    image = tmp_path / "image.png"
    image.write_bytes(png_bytes(shape_image()))
    client = frozen_client(server.target, image, 2000)
    try:
        started = time.monotonic()
        if keepalive > 30:
            # Nothing stops it: the generation runs to its end (2,000 steps, about 10 s) with its stream
            # still open, its output unread.
            wait_for(lambda: backend.steps >= 2000, timeout=120, message="the generation never reached its end")
            assert server.engine.open_streams == 1, "without keepalive the frozen client's stream should still be open"
            return
        wait_idle(server.engine, timeout=15)
        stopped_after = time.monotonic() - started
    finally:
        client.kill()
        client.wait()
    print(f"frozen client: generation stopped after {stopped_after:.1f} s, {backend.steps} steps")
    assert backend.steps < 1500, "the generation ran on for a client that stopped reading"


def test_a_frozen_client_on_a_real_model_has_its_generation_stopped(noise_server, tmp_path, monkeypatch):
    """The frozen-client path on a real model: the tiny SmolVLM writes a few bytes per token, so its
    whole answer (4,000 tokens) would fit in the transport's buffers and the server's writes never
    block. The unanswered keepalive ping (0.5 s + 0.5 s) must drop the connection and stop the
    generation long before its budget; before the ping timeout was set it ran to the end of its
    context and the RPC ended OK. The back-pressure guard is given a limit it cannot reach."""
    monkeypatch.setattr(job_module, "_BACKLOG", 10**9)
    server = noise_server(keepalive_time=0.5, keepalive_timeout=0.5, max_new_tokens_limit=4096)
    image = tmp_path / "image.png"
    image.write_bytes(png_bytes(shape_image()))
    scheduler = server.engine.models["noise"].scheduler
    client = frozen_client(server.target, image, 4000)
    try:
        wait_for(lambda: scheduler.running == 1 or not server.engine.open_streams, timeout=30)
        job = scheduler._active[0] if scheduler.running else None
        wait_idle(server.engine, timeout=60)
        cancelled = job is not None and job.cancelled  # before the kill, which would cancel it too
    finally:
        client.kill()
        client.wait()
    assert job is not None, "the generation ended before the test could watch it"
    print(f"frozen client on a real model: stopped after {job.timeline.tokens} tokens")
    assert cancelled, "the frozen client's RPC was not cancelled while the client was still frozen"
    assert job.timeline.tokens < 3000, "the generation ran on for a client that stopped reading"


def test_a_reader_that_resumes_on_a_real_models_batch_gets_its_true_outcome(noise_server):
    """The resumed-reader path on a real model, in a real batch: a client with a small receive window
    (1 KB, no window growth) reads one message and then nothing, so the model's text piles up on the
    server; the back-pressure guard (keepalive 0.25 s + 0.25 s) stops its row while another stream in
    the batch goes on to its whole answer. When the client reads again it gets the text sent so far and
    then why it ended (ABORTED, "read nothing"), not the watchdog's "stalled"."""
    server = noise_server(keepalive_time=0.25, keepalive_timeout=0.25, max_new_tokens_limit=4096)
    small_window = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
    job_of = {}
    scheduler = server.engine.models["noise"].scheduler
    with grpc.insecure_channel(server.target, options=small_window) as slow, server.channel() as channel:
        paused = server.stub(slow).Caption(caption_request(max_new_tokens=4000), timeout=120)
        assert next(paused).text
        wait_for(lambda: scheduler.running == 1, timeout=30)
        job_of["paused"] = scheduler._active[0]
        beside = list(server.stub(channel).Caption(caption_request(shape_image("blue"), max_new_tokens=64)))
        assert beside[-1].usage.completion_tokens == 64, "the other row got its whole answer"
        wait_for(lambda: job_of["paused"].abandoned, timeout=60, message="the guard never stopped the row")
        wait_idle(server.engine, timeout=60)
        received = 1
        with pytest.raises(grpc.RpcError) as ended:
            for message in paused:
                received += bool(message.text)
    assert ended.value.code() == grpc.StatusCode.ABORTED, ended.value
    assert "read nothing" in ended.value.details() and "stalled" not in ended.value.details()
    assert received > 1 and job_of["paused"].backlog == 0, "the text sent so far was read, then the outcome"
