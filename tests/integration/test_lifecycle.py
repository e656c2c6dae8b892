"""Reliability, round two, against real servers on loopback: image work off the event loop, a stuck
model, stopping in every state, out-of-memory in a batch, a port in use, a reader that resumes.

Server processes (signals, exit codes) run the real ``vlm-service`` command line through
``tests.fake_server``, which registers the fake family first."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import grpc
import pytest
import torch
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from PIL import Image, ImageDraw

from tests import fakes
from tests.helpers import ServerThread, caption_request, png_bytes, wait_for
from vlm.v1 import vlm_service_pb2 as pb
from vlm_service.backends.decode_batch import DecodeBatch
from vlm_service.config import Settings
from vlm_service.core import device_failures
from vlm_service.images import decode as image_decoding
from vlm_service.server import EXIT_MODEL_STUCK, StartupError, VLMServer

ROOT = Path(__file__).resolve().parents[2]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    return info.value


def health(channel, service: str = "", timeout: float = 2.0):
    request = health_pb2.HealthCheckRequest(service=service)
    return health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout).status


def retry_delay(error: grpc.RpcError) -> float | None:
    status = rpc_status.from_call(error)
    for detail in status.details if status else ():
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return info.retry_delay.ToMilliseconds() / 1000
    return None


def big_picture(megapixels: int = 36) -> bytes:
    """A PNG of ``megapixels`` million pixels that compresses to well under the byte limit."""
    side = int((megapixels * 1_000_000) ** 0.5)
    image = Image.new("RGB", (side, side), "white")
    draw = ImageDraw.Draw(image)
    for i in range(0, side, 97):
        draw.line((0, i, side, side - i), fill=(i % 255, 80, 160), width=3)
    return png_bytes(image)


# --- image work off the event loop ---------------------------------------------------------------


def test_a_flood_of_big_images_delays_neither_health_nor_running_streams(fake, monkeypatch):
    """Eight Captions of a 36-megapixel PNG (inside every limit) while a stream runs: decoding happens
    in threads, at most ``--max-image-decodes`` at once, so health answers and the stream flows through
    the flood. Bounded by events, not wall time: each real decode, once done, waits inside the decoder
    until the stream has delivered three more messages and health has answered again. A decode on the
    event loop would hold the loop, so that progress could never come and the decode would give up after
    60 s, failing the test; threads let it come within milliseconds however busy the machine."""
    server = fake(max_image_decodes=2)
    fakes.FakeBackend.pieces = ["x"] * 2000
    fakes.FakeBackend.step_delay = 0.01  # a message every 10 ms for 20 s, longer than the flood
    picture = big_picture()
    limits = Settings()
    assert len(picture) < limits.max_image_bytes
    real = image_decoding.decode_in_pool
    arrivals: list[float] = []
    answered: list[float] = []  # health checks answered SERVING
    in_decoder, most_in_decoder, stalled = [0], [0], []
    lock, decoded = threading.Lock(), [0]

    def decode_then_await_progress(data, **kwargs):
        if data != picture:  # the running stream's own picture
            return real(data, **kwargs)
        with lock:
            in_decoder[0] += 1
            most_in_decoder[0] = max(most_in_decoder[0], in_decoder[0])
        try:
            image = real(data, **kwargs)
            messages, checks = len(arrivals), len(answered)
            deadline = time.monotonic() + 60
            while not stalled and (len(arrivals) < messages + 3 or len(answered) < checks + 1):
                if time.monotonic() > deadline:
                    stalled.append((len(arrivals) - messages, len(answered) - checks))
                    break
                time.sleep(0.005)
            return image
        finally:
            with lock:
                in_decoder[0] -= 1
                decoded[0] += 1

    monkeypatch.setattr(image_decoding, "decode_in_pool", decode_then_await_progress)
    started = time.monotonic()
    with server.channel() as channel, server.channel() as flood_channel, server.channel() as probe:
        stub, flood_stub = server.stub(channel), server.stub(flood_channel)
        stream = stub.Caption(caption_request(max_new_tokens=2000))

        ended: list[grpc.StatusCode] = []  # how the stream ended, read in the reader thread

        def read() -> None:
            try:
                for message in stream:
                    if message.text:
                        arrivals.append(time.monotonic())
            except grpc.RpcError as error:  # the test cancels the stream at the end
                ended.append(error.code())

        reader = threading.Thread(target=read)
        reader.start()
        wait_for(lambda: len(arrivals) >= 5, timeout=60, message="the stream never started")
        flood = [flood_stub.Caption(caption_request(picture, max_new_tokens=1)) for _ in range(8)]
        done = threading.Event()
        outcomes = []

        def wait_flood() -> None:
            try:
                for call in flood:
                    outcomes.append(list(call)[-1].finish_reason)
            finally:
                done.set()

        waiter = threading.Thread(target=wait_flood)
        waiter.start()
        while not done.is_set():
            assert health(probe, timeout=60) == SERVING
            answered.append(time.monotonic())
            if decoded[0] == 8 and stream.is_active():
                stream.cancel()  # every decode has had its progress; the flood's captions wait for the slot
            time.sleep(0.02)
        waiter.join()
        stream.cancel()
        reader.join(30)
    assert not reader.is_alive() and ended == [grpc.StatusCode.CANCELLED], ended  # only the test's own cancel
    print(
        f"flood of 8 x 36 MP: {time.monotonic() - started:.1f} s, at most {most_in_decoder[0]} decodes at once; "
        f"{len(answered)} health checks, {len(arrivals)} stream messages"
    )
    assert outcomes == [pb.FINISH_REASON_LENGTH] * 8
    assert not stalled, f"no progress while a decode waited (messages, health answers): {stalled}"
    assert 1 <= most_in_decoder[0] <= 2, "--max-image-decodes 2 bounds the decodes in progress"


def test_decodes_in_progress_hold_neither_health_nor_a_running_stream(fake, monkeypatch):
    """Two decodes are held inside the decoder (after decoding a 36-megapixel PNG) while a stream runs:
    health answers and the stream goes on delivering, however slow the machine. Were decoding on the
    event loop, the held decode would hold the loop: health would time out and the stream would stop."""
    server = fake(max_image_decodes=2)
    fakes.FakeBackend.pieces = ["x"] * 2000
    fakes.FakeBackend.step_delay = 0.01
    release, inside = threading.Event(), threading.Semaphore(0)
    real = image_decoding.decode_in_pool

    picture = big_picture()

    def held(data, **limits):
        image = real(data, **limits)
        if data == picture:  # the flood's pictures, not the running stream's
            inside.release()
            release.wait(300)  # longer than any wait below: an expired hold must not pass the test
        return image

    monkeypatch.setattr(image_decoding, "decode_in_pool", held)
    arrivals: list[pb.CaptionResponse] = []
    try:
        with server.channel() as channel, server.channel() as flood_channel, server.channel() as probe:
            stub, flood_stub = server.stub(channel), server.stub(flood_channel)
            stream = stub.Caption(caption_request(max_new_tokens=2000))

            ended: list[grpc.StatusCode] = []  # how the stream ended, read in the reader thread

            def read() -> None:
                try:
                    for message in stream:
                        if message.text:
                            arrivals.append(message)
                except grpc.RpcError as error:  # the test cancels the stream at the end
                    ended.append(error.code())

            reader = threading.Thread(target=read)
            reader.start()
            wait_for(lambda: len(arrivals) >= 5, timeout=60, message="the stream never started")
            flood = [flood_stub.Caption(caption_request(picture, max_new_tokens=1)) for _ in range(4)]
            assert inside.acquire(timeout=60) and inside.acquire(timeout=60), "two decodes should be in progress"
            while_held = len(arrivals)
            for _ in range(5):
                assert health(probe, timeout=10) == SERVING
            deadline = time.monotonic() + 60
            while len(arrivals) < while_held + 30:
                assert time.monotonic() < deadline, "the stream stopped while decodes were in progress"
                time.sleep(0.01)
            release.set()
            stream.cancel()
            reader.join(30)
            assert not reader.is_alive() and ended == [grpc.StatusCode.CANCELLED], ended  # the test's own cancel
            assert [list(call)[-1].finish_reason for call in flood] == [pb.FINISH_REASON_LENGTH] * 4
    finally:
        release.set()


def test_image_decodes_beyond_the_limit_get_resource_exhausted_at_once(fake, monkeypatch):
    server = fake(max_image_decodes=1, max_streams=3)  # 1 decoding + 3 waiting
    gate, entered = threading.Event(), threading.Event()
    real = image_decoding.decode_in_pool

    def held(data, **limits):
        entered.set()
        gate.wait(20)
        return real(data, **limits)

    monkeypatch.setattr(image_decoding, "decode_in_pool", held)
    decoder = server.server.decoder
    with server.channel() as channel:
        stub = server.stub(channel)
        admitted = [stub.Caption(caption_request()) for _ in range(4)]
        assert entered.wait(10)
        deadline = time.monotonic() + 10
        while decoder.admitted < 4:
            assert time.monotonic() < deadline, "the four requests never reached the decoder"
            time.sleep(0.005)
        error = rpc_error(stub.Caption(caption_request()))
        assert decoder.admitted == 4, "refused while the four held decodes still hold the decoder"
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "being decoded" in error.details()
        assert retry_delay(error) == 0.5
        gate.set()
        for call in admitted:  # decoded, then served, or refused by --max-streams (3) once decoded
            try:
                assert list(call)[-1].finish_reason == pb.FINISH_REASON_STOP
            except grpc.RpcError as late:
                assert late.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "streams open" in late.details()
    assert decoder.admitted == 0


# --- a stuck model -----------------------------------------------------------------------------


def test_a_stuck_model_stops_serving_and_its_requests_end_at_once(fake):
    server = fake(stall_timeout=0.5)
    fakes.FakeBackend.step_gate = threading.Event()  # from now on the model hangs in its first step
    backend = fakes.FakeBackend.instances[-1]
    with server.channel() as channel:
        stub = server.stub(channel)
        running = stub.Caption(caption_request(), timeout=30)
        running.initial_metadata()
        deadline = time.monotonic() + 5
        while not backend.started:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        queued = stub.Caption(caption_request(), timeout=30)
        queued.initial_metadata()
        # The watchdog ends both (ABORTED, UNAVAILABLE), not their 30 s deadlines (DEADLINE_EXCEEDED).
        error = rpc_error(running)
        assert error.code() == grpc.StatusCode.ABORTED and "stalled" in error.details()
        error = rpc_error(queued)
        assert error.code() == grpc.StatusCode.UNAVAILABLE and "stuck" in error.details()
        error = rpc_error(stub.Caption(caption_request(), timeout=30))
        assert error.code() == grpc.StatusCode.UNAVAILABLE and "stuck" in error.details()
        assert health(channel) == NOT_SERVING
        assert not stub.ListModels(pb.ListModelsRequest()).models[0].ready
    assert server.server.stuck_models == ["fake"]


def serve_process(tmp_path: Path, *serve_args: str, runner_args=()) -> tuple[subprocess.Popen, str]:
    """Start ``vlm-service serve`` (fake family) on a free port; return the process and its address."""
    command = [
        sys.executable,
        "-m",
        "tests.fake_server",
        "--checkpoint-parent",
        str(tmp_path),
        *runner_args,
        "--",
        "serve",
        "--model",
        f"fake={tmp_path / 'fake-checkpoint'}",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--cache-dir",
        str(tmp_path / "cache"),
        *serve_args,
    ]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    match = re.search(r"listening on ([\d.]+:\d+)", line)
    assert match, f"no address in {line!r}; stderr: {process.stderr.read() if process.poll() is not None else ''}"
    return process, match.group(1)


def wait_for_health(address: str, status, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        while True:
            try:
                if health(channel) == status:
                    return
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, f"health never became {status}"
            time.sleep(0.05)


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.communicate(timeout=10)


def test_a_stuck_model_makes_the_server_exit_non_zero(tmp_path):
    process, address = serve_process(tmp_path, "--stall-timeout", "1", "--grace-period", "1", runner_args=["--hang"])
    try:
        wait_for_health(address, SERVING)
        with grpc.insecure_channel(address) as channel:
            stub = pb_stub(channel)
            error = rpc_error(stub.Caption(caption_request(), timeout=30))
            assert error.code() == grpc.StatusCode.ABORTED
        assert process.wait(timeout=15) == EXIT_MODEL_STUCK
        assert "no longer serves" in process.stderr.read()
    finally:
        stop_process(process)


def pb_stub(channel):
    from vlm.v1 import vlm_service_pb2_grpc as pb_grpc

    return pb_grpc.VisionLanguageServiceStub(channel)


# --- stopping in every state ---------------------------------------------------------------------


def test_sigterm_while_a_model_loads_exits_within_seconds(tmp_path):
    process, address = serve_process(tmp_path, runner_args=["--load-seconds", "120"])
    try:
        wait_for_health(address, NOT_SERVING)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=10)
        elapsed = time.monotonic() - started
        print(f"SIGTERM while loading: exited {code} after {elapsed:.2f} s")
        assert code == 0 and elapsed < 10
    finally:
        stop_process(process)


def test_sigterm_while_a_checkpoint_builds_exits_within_seconds(tmp_path):
    """First use of a built-in model that is not shipped, in an empty cache, builds it (the real-size
    SmolVLM twin: about 10 s here; the tiny ones ship with the package): a SIGTERM meanwhile stops the
    server within seconds, and no half-built checkpoint is left to be served."""
    cache = tmp_path / "empty-cache"
    command = [
        *(sys.executable, "-m", "vlm_service.cli", "serve", "--model", "smolvlm-256m-shapes"),
        *("--host", "127.0.0.1", "--port", "0", "--cache-dir", str(cache), "--log-level", "info"),
    ]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "listening" in process.stdout.readline()
        for line in process.stderr:
            if "building checkpoint" in line:
                break
        else:
            pytest.fail("the server never started building the checkpoint")
        time.sleep(1)  # well inside the build
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=10)
        elapsed = time.monotonic() - started
        print(f"SIGTERM while building: exited {code} after {elapsed:.2f} s")
        assert code == 0 and elapsed < 10
        assert not [p for p in cache.iterdir() if (p / "config.json").is_file()], "nothing half-built is served"
    finally:
        stop_process(process)


def test_a_second_signal_exits_at_once(tmp_path):
    process, address = serve_process(tmp_path, "--grace-period", "60", "--stall-timeout", "600", runner_args=["--hang"])
    try:
        wait_for_health(address, SERVING)
        with grpc.insecure_channel(address) as channel:
            call = pb_stub(channel).Caption(caption_request(), timeout=60)
            call.initial_metadata()  # a generation runs (and hangs): the drain would wait 60 s for it
            process.send_signal(signal.SIGTERM)
            wait_for_health(address, NOT_SERVING, timeout=10)
            process.send_signal(signal.SIGTERM)
            code = process.wait(timeout=10)  # a hang guard: the drain alone would wait 60 s
        assert code == 128 + signal.SIGTERM, "the second signal's immediate exit, not the drain's (0)"
    finally:
        stop_process(process)


def test_sigterm_while_a_model_call_never_returns_exits_after_the_grace_period(tmp_path):
    """A generation inside a model call that does not return (a long prefill, a hung kernel): SIGTERM
    drains for the grace period, gives the scheduler 2 s more, then exits 0 without waiting for it."""
    process, address = serve_process(tmp_path, "--grace-period", "1", "--stall-timeout", "600", runner_args=["--hang"])
    try:
        wait_for_health(address, SERVING)
        with grpc.insecure_channel(address) as channel:
            call = pb_stub(channel).Caption(caption_request(), timeout=60)
            call.initial_metadata()
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            code = process.wait(timeout=15)
            elapsed = time.monotonic() - started
        print(f"SIGTERM with a model call that never returns: exited {code} after {elapsed:.1f} s")
        assert code == 0 and "exiting without waiting" in process.stderr.read()
    finally:
        stop_process(process)


# --- out of memory in a batch ------------------------------------------------------------------------


def test_out_of_memory_in_a_batch_frees_memory_once_after_the_traceback_is_gone(cache_dir, noise_dir, monkeypatch):
    """Three rows decode together when the step runs out of memory: every row gets RESOURCE_EXHAUSTED
    with RetryInfo, and memory is freed once, after the tensors the failed step held were let go."""
    server = ServerThread(Settings(models=[f"noise={noise_dir}"], cache_dir=cache_dir, grace_period=0.0))
    server.wait_ready()
    held: list[weakref.ref] = []
    freed: list[list[bool]] = []
    step = DecodeBatch.decode_step

    def step_that_runs_out_of_memory(self):
        if len(self.rows) < 3:
            return step(self)
        activations = torch.empty(4_000_000)  # what the failed step's frames hold
        held.append(weakref.ref(activations))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

    monkeypatch.setattr(DecodeBatch, "decode_step", step_that_runs_out_of_memory)
    monkeypatch.setattr(device_failures, "free_memory", lambda: freed.append([ref() is None for ref in held]))
    try:
        with server.channel() as channel:
            stub = server.stub(channel)
            calls = [stub.Caption(caption_request(max_new_tokens=400)) for _ in range(3)]
            errors = [rpc_error(call) for call in calls]
            for error in errors:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "out of memory" in error.details()
                assert retry_delay(error) == 5.0
            assert freed == [[True]], "memory is freed once per failed step, after its frames were let go"
            monkeypatch.undo()
            answer = list(stub.Caption(caption_request(max_new_tokens=8)))
            assert answer[-1].finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    finally:
        server.stop()


# --- a port in use -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_a_metrics_port_in_use_fails_the_start_with_one_line_and_nothing_listening(tmp_path, cache_dir):
    grpc_port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        metrics_port = taken.getsockname()[1]
        fakes.register(tmp_path)
        command = [
            *(sys.executable, "-m", "tests.fake_server", "--checkpoint-parent", str(tmp_path), "--", "serve"),
            *("--model", f"fake={tmp_path / 'fake-checkpoint'}", "--host", "127.0.0.1"),
            *("--port", str(grpc_port), "--metrics-port", str(metrics_port)),
        ]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert result.returncode == 2
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert lines == [f"vlm-service: cannot serve metrics on 127.0.0.1:{metrics_port}: Address already in use"]
        assert not listening(grpc_port)
        # In-process too: the start fails and the gRPC port is not left listening.
        settings = Settings(
            models=[f"fake={tmp_path / 'fake-checkpoint'}"],
            cache_dir=cache_dir,
            host="127.0.0.1",
            port=grpc_port,
            metrics_port=metrics_port,
        )
        import asyncio

        with pytest.raises(StartupError, match="cannot serve metrics"):
            asyncio.run(VLMServer.start(settings))
        assert not listening(grpc_port)


# --- a reader that pauses, then resumes ------------------------------------------------------------


def test_a_reader_that_resumes_gets_its_true_outcome(fake):
    """A client that stops reading long enough has its generation stopped (the back-pressure guard);
    when it reads again it gets the text sent so far and then why it ended, at once, not "stalled"
    after the stall timeout."""
    server = fake(keepalive_time=0.25, keepalive_timeout=0.25, stall_timeout=1.0)  # the guard acts after 0.5 s
    fakes.FakeBackend.pieces = ["x" * 20_000] * 2000  # far more than the transport buffers
    fakes.FakeBackend.step_delay = 0.001
    backend = fakes.FakeBackend.instances[-1]
    with server.channel() as channel:
        call = server.stub(channel).Caption(caption_request(max_new_tokens=2000), timeout=30)
        assert next(call).text
        scheduler = server.engine.models["fake"].scheduler
        wait_for(lambda: scheduler.running == 0, timeout=30, message="the generation never ended while nobody read")
        steps = backend.steps
        assert steps < 2000, "the guard should have stopped the generation while nobody read"
        received = 1
        with pytest.raises(grpc.RpcError) as info:
            for message in call:
                received += bool(message.text)
    error = info.value
    # Why it ended, as the guard recorded it: not "stalled" (the watchdog, after the stall timeout).
    assert error.code() == grpc.StatusCode.ABORTED
    assert "read nothing" in error.details() and "stalled" not in error.details()
    assert received <= steps


# --- every status code is documented ------------------------------------------------------------------


def test_every_status_code_the_server_sends_is_documented_in_the_proto_and_the_docs():
    from vlm_service.api.status import OTHER_STATUS_CODES, STATUS_CODES

    sent = {code.name for code in STATUS_CODES.values()} | {code.name for code in OTHER_STATUS_CODES}
    proto = (ROOT / "protos/vlm/v1/vlm_service.proto").read_text()
    service_comment = proto[proto.index("// Errors are reported") : proto.index("service VisionLanguageService")]
    in_proto = set(re.findall(r"^//\s+([A-Z_]{5,})\s", service_comment, re.MULTILINE))
    # The status-code table of the docs' guarantees page (the README links to it).
    guarantees = (ROOT / "docs" / "guarantees.md").read_text()
    table = guarantees[guarantees.index("## Status codes") :]
    table = table[: table.index("\n\n", table.index("| Code"))]
    in_docs = set(re.findall(r"^\| `([A-Z_]+)` \|", table, re.MULTILINE))
    assert in_proto == sent, f"proto comment: missing {sent - in_proto}, extra {in_proto - sent}"
    assert in_docs == sent, f"docs/guarantees.md's table: missing {sent - in_docs}, extra {in_docs - sent}"
    # The codes with several causes name each of them, in both places.
    causes = {
        "RESOURCE_EXHAUSTED": ("out of memory", "queue", "--max-streams", "decod"),
        "DEADLINE_EXCEEDED": ("cannot be met",),
        "ABORTED": ("stalled", "read nothing"),
        "UNAVAILABLE": ("loading", "draining", "stuck"),
    }
    for code, needles in causes.items():
        row = re.search(rf"^\| `{code}` \|.*$", table, re.MULTILINE).group(0)
        line = re.search(rf"^//\s+{code}\s.*(\n//\s{{4,}}.*)*", service_comment, re.MULTILINE).group(0)
        for needle in needles:
            assert needle in row, f"docs/guarantees.md's {code} row does not mention {needle!r}"
            assert needle in line, f"the proto's {code} line does not mention {needle!r}"
