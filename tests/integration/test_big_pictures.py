"""Big pictures with real models: each is reduced to the largest picture its model uses as it is
decoded, and prepared (the processor) off the model's thread, so the streams already running keep
flowing. Real models, not the fake: the processor and the model compete for the GIL and the CPU.
How long health and a running stream wait under a flood is measured by ``make bench-flood``."""

from __future__ import annotations

import threading
import time

import grpc
import torch

from tests.helpers import ServerThread, caption_request, shape_image, wait_for
from tests.integration.test_lifecycle import big_picture
from vlm.v1 import vlm_service_pb2 as pb
from vlm_service.config import Settings
from vlm_service.image_decoding import image_digest


def test_a_big_picture_is_reduced_and_prepared_off_the_model_thread_while_a_stream_runs(smolvlm_server, monkeypatch):
    """A 36-megapixel picture reaches the processor at the model's longest edge, in a preparation
    thread. Bounded by events: once prepared, the big request waits (in its preparation thread) until
    the running stream has delivered three more messages. Prepared on the model's thread, it would hold
    that thread: the stream could never move, and the wait would give up after 60 s, failing the test."""
    backend = smolvlm_server.engine.models["noise"].backend
    picture = big_picture()
    digest = image_digest(picture)
    real_prepare = backend.prepare
    arrivals: list[float] = []
    seen, stalled = [], []

    def prepare_then_await_progress(request):
        inputs = real_prepare(request)
        if request.image_digest == digest:
            seen.append((threading.current_thread().name, request.image.size))
            messages, deadline = len(arrivals), time.monotonic() + 60
            while len(arrivals) < messages + 3:
                if time.monotonic() > deadline:
                    stalled.append(len(arrivals) - messages)
                    break
                time.sleep(0.005)
        return inputs

    monkeypatch.setattr(backend, "prepare", prepare_then_await_progress)
    errors: list[grpc.RpcError] = []
    with smolvlm_server.channel() as channel:
        stub = smolvlm_server.stub(channel)
        stream = stub.Caption(caption_request(model="noise", max_new_tokens=2000))

        def read() -> None:
            try:
                for message in stream:
                    if message.text:
                        arrivals.append(time.monotonic())
            except grpc.RpcError as error:
                errors.append(error)

        reader = threading.Thread(target=read)
        reader.start()
        try:
            wait_for(lambda: len(arrivals) >= 5, timeout=60, message="the stream never started")
            big = list(stub.Caption(caption_request(picture, model="noise", max_new_tokens=2), timeout=300))
            still_running = reader.is_alive()
        finally:
            stream.cancel()
            reader.join(30)
    assert still_running, "the running stream ended before the big picture was answered"
    assert [error.code() for error in errors] == [grpc.StatusCode.CANCELLED]  # the test's own cancel
    assert big[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert not stalled, f"the running stream did not move while the big picture was prepared: {stalled}"
    ((thread, size),) = seen
    assert thread.startswith("vlm-prepare"), f"prepared in {thread}"
    longest = min(backend.processor.image_processor.size["longest_edge"], 4096)
    assert max(size) == longest < 6000, f"the processor got a {size} picture"


def test_preparing_a_request_leaves_the_models_torch_thread_count_alone(cache_dir, noise_dir):
    """The model's thread runs with the count it was given (``--torch-threads 2``) after requests were
    prepared in other threads: torch.set_num_threads in one thread reaches the others, so nothing but the
    loader and the schedulers may call it (a preparation pool that set one thread for itself left a
    real-size model decoding on one core, 1.9x slower)."""
    server = ServerThread(Settings(models=[f"noise={noise_dir}"], cache_dir=cache_dir, torch_threads=2, grace_period=0))
    try:
        server.wait_ready()
        scheduler = server.engine.models["noise"].scheduler
        counts: list[int] = []
        scheduler.step_gate = lambda job: counts.append(torch.get_num_threads())  # in the model's thread
        with server.channel() as channel:
            stub = server.stub(channel)
            for colour in ("red", "green", "blue"):
                list(stub.Caption(caption_request(shape_image(colour), max_new_tokens=4), timeout=60))
        assert counts and set(counts) == {2}, counts
    finally:
        server.stop()
