"""A real server on 127.0.0.1:0 serving tiny-smolvlm, driven by a real gRPC client."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.helpers import (
    ServerThread,
    StepGate,
    caption_request,
    end_after_chunks,
    held_until_stopped,
    keep_up,
    png_bytes,
    query_request,
    shape_image,
    wait_idle,
)
from vlm.v1 import vlm_service_pb2 as pb
from vlm_service.backends.detokenizer import IncrementalDetokenizer
from vlm_service.config import Settings
from vlm_service.core.text import TextAssembler, clean_answer
from vlm_service.types import CaptionLength, GenerationRequest, SamplingParams, Task


def in_process_answer(
    server, task: Task, image, question="", length=CaptionLength.NORMAL, max_new_tokens=40, model="tiny-smolvlm"
):
    """What ``model.generate`` gives in-process for the same request, decoded in one go, and the ids."""
    backend = server.engine.models[model].backend
    request = GenerationRequest("x", model, task, image, SamplingParams(max_new_tokens), question, length)
    inputs = backend.prepare(request)
    with torch.inference_mode():
        output = backend.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    ids = output[0, inputs["input_ids"].shape[1] :].tolist()
    text, _ = clean_answer(backend.tokenizer.decode(ids, skip_special_tokens=True))
    return text, ids, backend.tokenizer


def expected_deltas(tokenizer, ids):
    """The deltas a per-token stream must send for these ids."""
    detok, assembler = IncrementalDetokenizer(tokenizer), TextAssembler()
    deltas = [assembler.push(detok.add_token(i)) for i in ids]
    deltas.append(assembler.push(detok.finish()))
    deltas.append(assembler.finish())
    return [d for d in deltas if d]


def assert_merges_of(texts: list[str], deltas: list[str]) -> None:
    """Each of ``texts`` is the concatenation of one or more consecutive ``deltas``, in order."""
    position = 0
    for text in texts:
        joined = ""
        while len(joined) < len(text) and position < len(deltas):
            joined += deltas[position]
            position += 1
        assert joined == text, f"message {text!r} is not whole deltas ({joined!r})"
    assert position == len(deltas)


@pytest.mark.parametrize(("model", "colour"), [("tiny-smolvlm", "red"), ("tiny-smolvlm", "blue"), ("noise", "red")])
def test_caption_stream_equals_in_process_generate(smolvlm_server, stub, model, colour):
    image = shape_image(colour, size=(120, 70))
    messages = list(stub.Caption(caption_request(image, model=model, length=pb.CAPTION_LENGTH_LONG, max_new_tokens=40)))
    texts = [m.text for m in messages if m.text]
    expected_text, ids, tokenizer = in_process_answer(
        smolvlm_server, Task.CAPTION, image, length=CaptionLength.LONG, model=model
    )
    assert "".join(texts) == expected_text
    # Per token: the deltas that decoding one token at a time releases. Deltas that pile up while the
    # client lags leave together (tests/unit/test_servicer.py pins both cases down), so each message
    # is one or more consecutive deltas, never part of one.
    assert_merges_of(texts, expected_deltas(tokenizer, ids))
    final = messages[-1]
    assert final.usage.completion_tokens == len(ids)
    assert final.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP)
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in messages[:-1])
    if model == "tiny-smolvlm":
        assert colour in expected_text  # the demo model sees


def test_a_reader_that_keeps_up_gets_one_message_per_token(smolvlm_server, stub):
    """Streaming granularity where it is defined: a long answer (random weights) read by a reader that
    keeps up. The scheduler is paced to its RPC (each decode step waits until the handler has taken the
    text sent so far: the ``keep_up`` step gate), so every message but the last is exactly the text of
    one token, and the last is the final token's text with the decoder's tail."""
    image = shape_image("red", size=(120, 70))
    scheduler = smolvlm_server.engine.models["noise"].scheduler
    wait_idle(smolvlm_server.engine)
    scheduler.step_gate = keep_up
    try:
        request = caption_request(image, model="noise", length=pb.CAPTION_LENGTH_LONG, max_new_tokens=200)
        texts = [m.text for m in stub.Caption(request) if m.text]
    finally:
        scheduler.step_gate = None
    _, ids, tokenizer = in_process_answer(
        smolvlm_server, Task.CAPTION, image, length=CaptionLength.LONG, max_new_tokens=200, model="noise"
    )
    deltas = expected_deltas(tokenizer, ids)
    assert len(ids) == 200 and len(deltas) >= 50
    assert texts[:-1] == deltas[: len(texts) - 1], "a message carried more (or less) than one token's text"
    assert_merges_of(texts, deltas)
    assert len(texts) >= len(deltas) - 2


def test_query_stream_equals_in_process_generate(smolvlm_server, stub):
    image = shape_image("green", size=(64, 128))
    messages = list(stub.Query(query_request("What colour is the shape?", image, max_new_tokens=30)))
    expected_text, ids, _ = in_process_answer(
        smolvlm_server, Task.QUERY, image, "What colour is the shape?", max_new_tokens=30
    )
    assert "".join(m.text for m in messages) == expected_text == "The shape is green."
    assert messages[-1].usage.completion_tokens == len(ids) < 30
    assert messages[-1].finish_reason == pb.FINISH_REASON_STOP
    assert messages[-1].usage.prompt_tokens > 30  # image tokens included


def test_max_new_tokens_is_exact_and_seed_is_reproducible(stub):
    def sample(seed):
        messages = list(stub.Caption(caption_request(model="noise", max_new_tokens=17, temperature=0.9, seed=seed)))
        assert messages[-1].usage.completion_tokens == 17
        return "".join(m.text for m in messages)

    first, again, other = sample(1), sample(1), sample(2)
    assert first == again
    assert first != other


def test_stop_string_ends_the_stream(stub):
    full = "".join(m.text for m in stub.Caption(caption_request(max_new_tokens=40, length=pb.CAPTION_LENGTH_LONG)))
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), "the tiny model's output should have text to stop on"
    messages = list(stub.Caption(caption_request(max_new_tokens=40, length=pb.CAPTION_LENGTH_LONG, stop=[stop])))
    text = "".join(m.text for m in messages)
    assert messages[-1].finish_reason == pb.FINISH_REASON_STOP_SEQUENCE
    assert text == clean_answer(full, [stop])[0]
    assert stop not in text


def test_client_cancel_stops_generation(smolvlm_server, stub):
    call, received, at_cancel, steps = end_after_chunks(smolvlm_server, stub, "noise", max_new_tokens=2000)
    assert received == 3
    assert call.code() == grpc.StatusCode.CANCELLED
    # Counted from the server's side of the cancel: the step that was running may finish, no other.
    assert steps - at_cancel <= 1, f"{steps - at_cancel} decode steps ran after the server had the cancel"
    assert steps < 2000, "the generation ran to its budget"
    # The scheduler is free: the next request is answered.
    assert list(stub.Caption(caption_request(model="noise", max_new_tokens=3)))[-1].usage.completion_tokens == 3


def test_deadline_ends_generation(smolvlm_server, stub):
    """The scheduler is held at the generation's fifth stop check while the RPC's deadline passes; once the
    server has ended the RPC, the generation stops at that step."""
    engine = smolvlm_server.engine
    served = engine.models["noise"]
    wait_idle(engine)
    with StepGate(served.scheduler, served.backend.model) as gate:
        gate.hold_when = lambda job: gate.steps_of(job) >= 5
        with pytest.raises(grpc.RpcError) as info:
            for _ in stub.Caption(caption_request(model="noise", max_new_tokens=2000), timeout=1.0):
                pass
        at_deadline, steps = held_until_stopped(engine, gate)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert steps - at_deadline <= 1, f"{steps - at_deadline} decode steps ran after the deadline ended the RPC"
    assert steps < 2000


def test_failing_generation_is_internal_and_the_next_request_succeeds(smolvlm_server, stub, monkeypatch):
    backend = smolvlm_server.engine.models["tiny-smolvlm"].backend
    original = backend.prepare
    calls = []

    def failing_once(request):
        calls.append(request.request_id)
        if len(calls) == 1:
            raise RuntimeError("CUDA exploded at /opt/secret/weights.bin")
        return original(request)

    monkeypatch.setattr(backend, "prepare", failing_once)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Caption(caption_request(max_new_tokens=5)))
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert calls[0] in info.value.details()  # the request id the logs share
    assert "secret" not in info.value.details() and "Traceback" not in info.value.details()
    messages = list(stub.Caption(caption_request(max_new_tokens=5)))
    assert messages[-1].usage.completion_tokens == 5 and messages[-1].finish_reason == pb.FINISH_REASON_LENGTH


def truncated_png() -> bytes:
    from PIL import Image

    data = png_bytes(Image.effect_noise((64, 64), 40).convert("RGB"))
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    ("request_", "code", "needle"),
    [
        (caption_request(b""), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        (caption_request(b"%PDF-1.4 not an image"), grpc.StatusCode.INVALID_ARGUMENT, "not a supported image"),
        (caption_request(truncated_png()), grpc.StatusCode.INVALID_ARGUMENT, "truncated"),
        (caption_request(model="gpt-7"), grpc.StatusCode.NOT_FOUND, "gpt-7"),
        (caption_request(top_p=2.0), grpc.StatusCode.INVALID_ARGUMENT, "options.top_p"),
        (caption_request(temperature=-0.5), grpc.StatusCode.INVALID_ARGUMENT, "options.temperature"),
        (caption_request(max_new_tokens=100_000), grpc.StatusCode.INVALID_ARGUMENT, "options.max_new_tokens"),
        (caption_request(response_language="ja"), grpc.StatusCode.INVALID_ARGUMENT, "supported: en"),
        (caption_request(stop=["a"] * 9), grpc.StatusCode.INVALID_ARGUMENT, "options.stop: 9 stop strings"),
        (caption_request(stop=["a", "b" * 65]), grpc.StatusCode.INVALID_ARGUMENT, "options.stop[1]: 65 characters"),
        (caption_request(stop=["ok", ""]), grpc.StatusCode.INVALID_ARGUMENT, "options.stop[1]"),
        (query_request(""), grpc.StatusCode.INVALID_ARGUMENT, "question"),
        (query_request("x" * 5000), grpc.StatusCode.INVALID_ARGUMENT, "question"),
    ],
)
def test_bad_inputs_get_precise_codes(stub, request_, code, needle):
    method = stub.Query if isinstance(request_, pb.QueryRequest) else stub.Caption
    with pytest.raises(grpc.RpcError) as info:
        list(method(request_))
    assert info.value.code() == code
    assert needle in info.value.details()


def test_list_models(stub):
    info, noise = stub.ListModels(pb.ListModelsRequest()).models
    assert (noise.name, noise.family, noise.is_default) == ("noise", "smolvlm", False)
    assert (info.name, info.family, info.ready, info.is_default) == ("tiny-smolvlm", "smolvlm", True, True)
    assert info.context_length == 4096
    assert set(info.caption_lengths) == {pb.CAPTION_LENGTH_SHORT, pb.CAPTION_LENGTH_NORMAL, pb.CAPTION_LENGTH_LONG}
    assert info.device == "cpu" and info.dtype == "float32"


def test_health_turns_serving_only_after_load(cache_dir, tiny_smolvlm_dir, monkeypatch):
    """While a model loads, health is NOT_SERVING and requests are UNAVAILABLE; then SERVING."""
    from vlm_service.backends import hf

    gate = threading.Event()
    original = hf.TransformersBackend.load

    def gated_load(self):
        gate.wait(30)
        original(self)

    monkeypatch.setattr(hf.TransformersBackend, "load", gated_load)
    server = ServerThread(Settings(models=["tiny-smolvlm"], cache_dir=cache_dir))
    try:
        with server.channel() as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "vlm.v1.VisionLanguageService"):
                reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as info:
                list(server.stub(channel).Caption(caption_request(), timeout=5))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            gate.set()
            server.wait_ready()
            reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            assert (
                list(server.stub(channel).Caption(caption_request(max_new_tokens=2)))[-1].usage.completion_tokens == 2
            )
    finally:
        gate.set()
        server.stop()


def test_health_answers_while_a_model_generates(smolvlm_server, stub):
    call = stub.Caption(caption_request(model="noise", max_new_tokens=2000))
    next(iter(call))
    with smolvlm_server.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        # Answered while the generation still runs: health never waits for the model.
        still_running = smolvlm_server.engine.models["noise"].scheduler.running
    call.cancel()
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert still_running == 1


def test_client_disconnect_stops_generation(smolvlm_server):
    """Closing the channel mid-stream (the client goes away) stops the generation too, counted in decode
    steps from the server's side of the disconnect."""
    channel = smolvlm_server.channel()
    stub = smolvlm_server.stub(channel)
    _, received, at_close, steps = end_after_chunks(
        smolvlm_server, stub, "noise", chunks=1, max_new_tokens=2000, end=lambda call: channel.close()
    )
    assert received == 1
    assert steps - at_close <= 1, f"{steps - at_close} decode steps ran after the server saw the disconnect"
    assert steps < 2000


def test_drain_cancels_the_streams_still_running_when_the_grace_period_ends(cache_dir, noise_dir):
    """SIGTERM's drain, second half: a stream still running when ``--grace-period`` ends is cancelled,
    and its generation stops (counted in decode steps from the server's cancel); the server stops."""
    server = ServerThread(Settings(models=[f"noise={noise_dir}"], cache_dir=cache_dir))
    server.wait_ready()
    served = server.engine.models["noise"]
    try:
        with StepGate(served.scheduler, served.backend.model) as gate, server.channel() as channel:
            call = server.stub(channel).Caption(caption_request(max_new_tokens=2000))
            chunks = iter(call)
            next(chunks)
            gate.close()  # the generation cannot finish within the grace period
            stopping = asyncio.run_coroutine_threadsafe(server.server.stop(0.5), server.loop)
            at_cancel, steps = held_until_stopped(server.engine, gate)
            with pytest.raises(grpc.RpcError) as info:
                list(chunks)
            stopping.result(30)
    finally:
        server.loop.call_soon_threadsafe(server.loop.stop)
    # The transport cuts the stream as the server stops: the client may retry on another instance.
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert steps - at_cancel <= 1, f"{steps - at_cancel} decode steps ran after the drain cancelled the stream"
    assert steps < 2000
    assert not served.scheduler._thread.is_alive(), "the scheduler thread outlived the server"


def test_drain_is_not_serving_refuses_new_rpcs_and_finishes_streams(cache_dir, noise_dir):
    server = ServerThread(Settings(models=[f"noise={noise_dir}"], cache_dir=cache_dir))
    server.wait_ready()
    stopped = None
    try:
        with server.channel() as channel:
            stub, health = server.stub(channel), health_pb2_grpc.HealthStub(channel)
            call = stub.Caption(caption_request(max_new_tokens=600))
            chunks = iter(call)
            next(chunks)
            stopped = asyncio.run_coroutine_threadsafe(server.server.stop(10), server.loop)
            deadline = time.monotonic() + 5
            while (
                health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                != health_pb2.HealthCheckResponse.NOT_SERVING
            ):
                assert time.monotonic() < deadline, "health never turned NOT_SERVING during the drain"
                time.sleep(0.01)
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Caption(caption_request(max_new_tokens=2), timeout=5))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            rest = list(chunks)  # the in-flight stream still finishes
            assert rest[-1].usage.completion_tokens == 600
        stopped.result(30)
    finally:
        server.loop.call_soon_threadsafe(server.loop.stop)
