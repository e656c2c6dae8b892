"""Chunked prefill: a joining request's prefill runs in chunks (groups of vision encoder layers over
each view of its picture, then spans of prompt tokens) between the decode steps of the requests already
streaming, so a new picture never freezes them for its whole prefill; and a request's answer is the
same alone as beside others, since its chunks depend on it alone.

The tiny SmolVLM with random weights stands in for a large model (`chunked_prefill="on"`; auto turns it
on from 50M parameters); its prompts are short, so the text part is cut into 48-token spans here, and
its 3-layer vision encoder into chunks of one layer."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import threading

import grpc
import pytest

from tests.helpers import (
    ServerThread,
    Sink,
    StepGate,
    caption_request,
    drain,
    query_request,
    run_rpc,
    shape_image,
    wait_for,
    wait_idle,
)
from vlm_service.backends.base import run_alone
from vlm_service.backends.runtime import ModelSpec, Runtime
from vlm_service.backends.smolvlm import SmolVLMBackend
from vlm_service.config import Settings
from vlm_service.types import GenerationRequest, SamplingParams, Task

TEXT_SPAN = 48
VISION_LAYERS = 1


@pytest.fixture(scope="module")
def chunked(noise_dir):
    backend = SmolVLMBackend(ModelSpec("noise", str(noise_dir)), Runtime(device="cpu", chunked_prefill="on"))
    backend.load()
    assert backend.prefill.chunked
    backend.prefill = dataclasses.replace(
        backend.prefill, text_chunk_tokens=TEXT_SPAN, vision_chunk_layers=VISION_LAYERS
    )
    return backend


def request(image, tokens: int, question: str = "") -> GenerationRequest:
    task = Task.QUERY if question else Task.CAPTION
    return GenerationRequest("r", "noise", task, image, SamplingParams(tokens), question)


def encoder_layers(backend):
    return backend.model.model.vision_model.encoder.layers


def chunks_of(backend, req: GenerationRequest) -> int:
    """How many chunks the request's prefill takes in a batch: one for the processor, one per group of
    encoder layers of each view, then one per text span."""
    inputs = backend.prepare(req)
    views, length = inputs["pixel_values"].shape[1], inputs["input_ids"].shape[1]
    return 1 + views * -(-len(encoder_layers(backend)) // VISION_LAYERS) + -(-length // TEXT_SPAN)


@contextlib.contextmanager
def on_every_layer(backend, hook):
    """``hook`` runs before each vision encoder layer (and can raise, failing the chunk)."""
    handles = [layer.register_forward_pre_hook(hook) for layer in encoder_layers(backend)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_chunked_image_features_equal_the_models_own(chunked, layers, monkeypatch):
    """The chunked path (a view at a time, ``layers`` encoder layers a chunk) gives bit for bit the
    features of ``model.get_image_features`` over the whole picture (its views batched)."""
    import torch

    from vlm_service.types import ImageDetail

    monkeypatch.setattr(chunked, "prefill", dataclasses.replace(chunked.prefill, vision_chunk_layers=layers))
    req = request(shape_image("blue", size=(200, 90)), 4)
    inputs = chunked.encode([chunked.prompt(req)], [req.image], ImageDetail.HIGH)
    vision = {key: inputs[key] for key in ("pixel_values", "pixel_attention_mask")}
    with torch.inference_mode():
        expected = torch.cat(list(chunked.model.get_image_features(**vision, return_dict=True).pooler_output))
        chunks, output = drain(chunked.encode_views(vision))
    features = torch.cat(list(output.pooler_output))
    assert chunks == vision["pixel_values"].shape[1] * -(-len(encoder_layers(chunked)) // layers)
    assert torch.equal(features, expected)


def test_auto_chunks_large_models_only(noise_dir):
    from vlm_service.backends.runtime import LARGE_MODEL_PARAMETERS

    def chunked(setting: str, parameters: int, chunking=SmolVLMBackend.chunking) -> bool:
        return Runtime(chunked_prefill=setting).prefill_policy(parameters, chunking).chunked

    assert chunked("auto", LARGE_MODEL_PARAMETERS)
    assert not chunked("auto", LARGE_MODEL_PARAMETERS - 1)
    assert not chunked("off", 10**10) and chunked("on", 1)
    assert not chunked("on", 10**10, chunking=None), "a family that cannot cut its prefill is never chunked"
    policy = Runtime(chunked_prefill="on", prefill_budget=0.1).prefill_policy(1, SmolVLMBackend.chunking)
    assert (policy.text_chunk_tokens, policy.vision_chunk_layers, policy.budget) == (128, 3, 0.1)
    tiny = SmolVLMBackend(ModelSpec("noise", str(noise_dir)), Runtime(device="cpu"))
    tiny.load()
    assert not tiny.prefill.chunked  # a few million parameters: its prefill is one piece


def test_a_joining_prefill_runs_chunk_by_chunk_while_a_running_row_decodes(chunked):
    """Row A decodes; B (a picture of 3 views and a prompt of 3 spans) joins: after each chunk of B's
    prefill, A gets a decode step; B's first token comes after its last chunk; both answers equal
    their answers alone."""
    a = request(shape_image("red", size=(96, 64)), 40)
    b = request(shape_image("blue", size=(200, 90)), 24, "What colour is the shape? Answer in a few words.")
    alone = {}
    for name, req in (("a", a), ("b", b)):
        sink = Sink()
        run_alone(chunked.new_batch(1), req, sink)
        alone[name] = "".join(sink.pieces)
    expected_chunks = chunks_of(chunked, b)
    assert expected_chunks >= 5, "the test needs a prefill of several chunks"

    batch = chunked.new_batch(4)
    sink_a, sink_b = Sink(), Sink()
    assert batch.join(a, sink_a) is None
    while batch.joining:
        batch.prefill_step()
    assert len(batch) == 1 and sink_a.pieces  # A streams
    (row_a,) = batch.rows
    assert batch.join(b, sink_b) is None and batch.joining == 1 and batch.next_prefill == [sink_b]
    chunks = 0
    a_tokens_during = []
    while batch.joining:
        ((_, outcome, joined),) = batch.prefill_step()
        chunks += 1
        assert outcome is None and joined == (batch.joining == 0)
        if not joined:
            assert not sink_b.pieces, "B wrote before its prefill ended"
            before = len(row_a.tokens)  # tokens, not pieces: a token may hold its text back (UTF-8)
            batch.decode_step()
            a_tokens_during.append(len(row_a.tokens) - before)
    assert chunks == expected_chunks
    assert len(a_tokens_during) == chunks - 1 and all(n == 1 for n in a_tokens_during), a_tokens_during
    assert sink_b.pieces and len(batch) == 2
    while len(batch):
        batch.decode_step()
    assert "".join(sink_a.pieces) == alone["a"] and "".join(sink_b.pieces) == alone["b"]


def test_a_request_cancelled_between_chunks_runs_no_more_of_its_prefill(chunked):
    b = request(shape_image("green", size=(200, 90)), 8)
    batch, sink = chunked.new_batch(2), Sink()
    assert batch.join(b, sink) is None
    batch.prefill_step()  # the first chunk: the first view's first encoder layer
    calls = []
    with on_every_layer(chunked, lambda *_: calls.append(1)):
        sink.stop = True
        ((returned, outcome, joined),) = batch.prefill_step()
    assert returned is sink and joined and outcome is not None and outcome.completion_tokens == 0
    assert calls == [] and batch.joining == 0 and len(batch) == 0 and sink.pieces == []


def test_a_failed_chunk_fails_only_its_request(chunked):
    a = request(shape_image("red", size=(96, 64)), 30)
    b = request(shape_image("blue", size=(200, 90)), 8)
    batch, sink_a, sink_b = chunked.new_batch(4), Sink(), Sink()
    batch.join(a, sink_a)
    while batch.joining:
        batch.prefill_step()
    batch.join(b, sink_b)
    batch.prefill_step()

    def boom(*args):
        raise RuntimeError("boom")

    with on_every_layer(chunked, boom):
        assert batch.next_prefill == [sink_b]
        with pytest.raises(RuntimeError, match="boom"):
            batch.prefill_step()
    assert batch.joining == 0 and len(batch) == 1  # A goes on
    (row_a,) = batch.rows
    before = len(row_a.tokens)
    batch.decode_step()
    assert len(row_a.tokens) == before + 1


@pytest.fixture(scope="module")
def chunked_server(cache_dir, noise_dir):
    """A server whose noise model prefills in chunks, one chunk between two decode steps (budget 0)."""
    server = ServerThread(
        Settings(
            models=[f"noise={noise_dir}"],
            cache_dir=cache_dir,
            grace_period=0.0,
            chunked_prefill="on",
            prefill_budget_ms=0,
        )
    )
    server.wait_ready()
    yield server
    server.stop()


def test_on_a_server_a_new_picture_never_holds_a_running_stream_for_its_whole_prefill(chunked_server):
    """The scheduler runs one chunk of the joining request's prefill between two decode steps of the
    stream already running (budget 0): the running stream gets a decode step after every chunk."""
    served = chunked_server.engine.models["noise"]
    batch = served.scheduler.batch
    served.backend.prefill = dataclasses.replace(
        served.backend.prefill, text_chunk_tokens=TEXT_SPAN, vision_chunk_layers=VISION_LAYERS
    )
    wait_idle(chunked_server.engine)
    events: list[str] = []
    lock = threading.Lock()
    prefill_step, decode_step = batch.prefill_step, batch.decode_step

    def recorded(name, call):
        def wrapper():
            result = call()
            with lock:
                events.append(name)
            return result

        return wrapper

    batch.prefill_step, batch.decode_step = recorded("chunk", prefill_step), recorded("step", decode_step)
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            # Long enough to outlast the joining request on a loaded machine; cancelled once it answered.
            channel = chunked_server.channel()
            long_call = chunked_server.stub(channel).Caption(caption_request(model="noise", max_new_tokens=1500))
            running = pool.submit(lambda: sum(1 for _ in long_call))
            wait_for(lambda: events.count("step") >= 5, message="the first stream never decoded")
            with lock:
                mark = len(events)
            joining = query_request(
                "What colour is the shape? Answer in a few words.",
                shape_image("blue", size=(200, 90)),
                model="noise",
                max_new_tokens=8,
            )
            text, last = pool.submit(run_rpc, chunked_server, joining).result(timeout=120)
            long_call.cancel()
            try:
                running.result(timeout=120)
            except grpc.RpcError as error:  # the test's own cancel; any other end is a failure
                assert error.code() == grpc.StatusCode.CANCELLED, error
            channel.close()
    finally:
        del batch.prefill_step, batch.decode_step
    assert last.usage.completion_tokens == 8
    after = events[mark:]
    chunk_positions = [i for i, name in enumerate(after) if name == "chunk"]
    question = "What colour is the shape? Answer in a few words."
    expected = chunks_of(served.backend, request(shape_image("blue", size=(200, 90)), 8, question))
    assert len(chunk_positions) == expected, after[:60]
    # Between two chunks of the new request's prefill, the running stream always got its decode step.
    for first, second in zip(chunk_positions, chunk_positions[1:], strict=False):
        assert "step" in after[first + 1 : second], after[:60]


def test_a_cached_picture_evicted_before_its_first_chunk_still_prefills(chunked):
    """X's features are cached (so its cached preprocessing has no pixels); X joins and its first chunk
    (the processor) runs, then Y's preprocessing evicts X's entry (a cache of one picture) before X's
    first model chunk: X still answers, the same as alone, from the features it took once prepared."""
    from vlm_service.images.cache import ImageCache

    previous = chunked.images
    chunked.images = ImageCache(1)
    try:
        x = dataclasses.replace(request(shape_image("red", size=(200, 90)), 12), image_digest="x")
        y = dataclasses.replace(request(shape_image("blue", size=(90, 200)), 12), image_digest="y")
        first = Sink()
        run_alone(chunked.new_batch(1), x, first)  # caches X's features; its preprocessing drops the pixels
        assert chunked.images.get(x.image_key, "features") is not None
        batch, again, other = chunked.new_batch(2), Sink(), Sink()
        assert batch.join(x, again) is None
        batch.prefill_step()  # X's processor
        assert batch.join(y, other) is None
        chunked.prepare(y)  # Y's preprocessing, as its own first chunk would run it
        assert chunked.images.get(x.image_key, "features") is None, "Y's preprocessing should have evicted X"
        while batch.joining or len(batch):
            if batch.joining:
                batch.prefill_step()
            else:
                batch.decode_step()
        assert "".join(again.pieces) == "".join(first.pieces) and other.pieces
    finally:
        chunked.images = previous


def test_a_grpc_cancel_during_a_chunked_prefill_runs_no_more_of_it(chunked_server):
    """Through gRPC: the client cancels while its request is between two chunks of its prefill (held at
    the stop check before its third chunk); the RPC ends CANCELLED, no further chunk of it runs, no
    first token is written, and the model serves the next request."""
    served = chunked_server.engine.models["noise"]
    served.backend.prefill = dataclasses.replace(
        served.backend.prefill, text_chunk_tokens=TEXT_SPAN, vision_chunk_layers=VISION_LAYERS
    )
    wait_idle(chunked_server.engine)
    batch = served.scheduler.batch
    chunks = []
    prefill_step = batch.prefill_step

    def counted():
        result = prefill_step()
        chunks.append(result)
        return result

    batch.prefill_step = counted
    gate = StepGate(served.scheduler, hold_when=lambda job: len(chunks) == 2)
    try:
        with gate, chunked_server.channel() as channel:
            call = chunked_server.stub(channel).Caption(
                caption_request(shape_image("green", size=(200, 90)), model="noise", max_new_tokens=8)
            )
            job = gate.wait_held()
            assert len(chunks) == 2, "held at the stop check of its third prefill step (popped from the queue)"
            call.cancel()
            wait_for(lambda: job.cancelled, timeout=30, message="the cancel never reached the job")
            gate.open()
            wait_idle(chunked_server.engine)
            with pytest.raises(grpc.RpcError) as ended:
                list(call)
        assert ended.value.code() == grpc.StatusCode.CANCELLED
        ran = len(chunks)
        assert ran == 3, f"{ran} prefill steps: the stop check after the cancel ends it, running none of its chunks"
        ((_, outcome, joined),) = chunks[-1]
        assert joined is True and outcome.reason.name == "STOP"
        assert outcome.completion_tokens == 0, "no first token was written"
        assert batch.joining == 0 and len(batch) == 0
    finally:
        del batch.prefill_step
    text, last = run_rpc(chunked_server, caption_request(model="noise", max_new_tokens=4))
    assert last.usage.completion_tokens == 4
