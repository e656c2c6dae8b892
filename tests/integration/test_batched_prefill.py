"""Batched prefill: requests that join a batch together (a model whose prefill is one piece) go through
the vision encoder and the language model together, and each still gets exactly its answer alone
(float32; test_bfloat16.py holds what bfloat16 keeps).

Driven on the backends themselves (SmolVLM and Qwen2-VL with random weights, float32), so the passes
can be counted; test_batching.py runs the same through a real server."""

from __future__ import annotations

import dataclasses
import hashlib
from contextlib import contextmanager

import pytest

from tests.helpers import Sink, shape_image
from vlm_service.backends.base import run_alone
from vlm_service.backends.qwen2_vl import Qwen2VLBackend
from vlm_service.backends.runtime import ModelSpec, Runtime
from vlm_service.backends.smolvlm import SmolVLMBackend
from vlm_service.types import GenerationRequest, SamplingParams, Task


@pytest.fixture(scope="module", params=["smolvlm", "qwen2-vl"])
def backend(request, cache_dir, noise_dir):
    if request.param == "smolvlm":
        family, directory = SmolVLMBackend, noise_dir
    else:
        from vlm_checkpoints.tiny_qwen2_vl import ensure_tiny_qwen2_vl

        family, directory = Qwen2VLBackend, ensure_tiny_qwen2_vl(cache_dir, trained=False)
    backend = family(ModelSpec("noise", str(directory)), Runtime(device="cpu", dtype="float32", image_cache_size=16))
    backend.load()
    assert not backend.prefill.chunked and backend.prefills_together
    return backend


def request(colour: str, size, tokens: int, question: str = "", cached: bool = True) -> GenerationRequest:
    image = shape_image(colour, size=size)
    digest = hashlib.sha256(f"{colour}{size}".encode()).hexdigest() if cached else ""
    task = Task.QUERY if question else Task.CAPTION
    return GenerationRequest("r", "noise", task, image, SamplingParams(tokens), question, image_digest=digest)


def alone(backend, req: GenerationRequest) -> tuple[str, int]:
    previous, backend.images = backend.images, type(backend.images)(0)  # no cache: computed afresh
    try:
        sink = Sink()
        outcome = run_alone(backend.new_batch(1), req, sink)
        return sink.text, outcome.completion_tokens
    finally:
        backend.images = previous


@contextmanager
def counted(backend):
    """Calls of the vision encoder (pictures, view shape) and forward passes of the language model
    (rows, tokens)."""
    calls = {"vision": [], "text": []}
    vision = backend.model.get_image_features

    def encoder(**kwargs):
        pixels, grid = kwargs["pixel_values"], kwargs.get("image_grid_thw")
        pictures = grid.shape[0] if grid is not None else pixels.shape[0]  # Qwen2-VL: patches of all
        calls["vision"].append((pictures, tuple(pixels.shape[1:])))
        return vision(**kwargs)

    text_model = getattr(backend.model.model, "text_model", None) or backend.model.model.language_model
    hook = text_model.register_forward_pre_hook(
        lambda _, args, kwargs: calls["text"].append(tuple(kwargs["inputs_embeds"].shape[:2])), with_kwargs=True
    )
    backend.model.get_image_features = encoder
    try:
        yield calls
    finally:
        del backend.model.get_image_features
        hook.remove()


@contextmanager
def vision_fails(backend):
    """The vision encoder raises RuntimeError("boom") (a prefill that fails: out of memory, say)."""

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    backend.model.get_image_features = boom
    try:
        yield
    finally:
        del backend.model.get_image_features


def requests_of_every_kind():
    """Different picture sizes (SmolVLM: different view counts; Qwen2-VL: different grids), captions
    and questions of different lengths, and two requests on the same picture."""
    return [
        request("red", (96, 64), 12),
        request("blue", (200, 90), 20, "What colour is the shape in this picture?"),
        request("green", (64, 64), 16, "Colour?"),
        request("blue", (200, 90), 9),  # the same picture as the second
        request("yellow", (90, 200), 25, "Describe the shape, its colour and where it is."),
    ]


def test_requests_joining_together_are_prefilled_in_one_pass_and_answer_as_alone(backend):
    requests = requests_of_every_kind()
    expected = [alone(backend, r) for r in requests]
    backend.images = type(backend.images)(16)
    batch = backend.new_batch(8)
    sinks = [Sink() for _ in requests]
    for req, sink in zip(requests, sinks, strict=True):
        assert batch.join(req, sink) is None
    assert batch.next_prefill == sinks
    with counted(backend) as calls:
        results = batch.prefill_step()
    assert [sink for sink, _, _ in results] == sinks
    assert all(joined and outcome is None for _, outcome, joined in results)
    assert batch.joining == 0 and len(batch) == len(requests)
    # One language-model pass for all five prompts, left-padded to the longest.
    assert len(calls["text"]) == 1 and calls["text"][0][0] == len(requests), calls["text"]
    # The shared picture is encoded once: four pictures, in one call per view shape.
    shapes = [shape for _, shape in calls["vision"]]
    assert sum(pictures for pictures, _ in calls["vision"]) == 4 and len(set(shapes)) == len(shapes), calls
    assert len(shapes) < 4, "no two pictures were encoded together"
    # The shared picture counts as the image cache's hit, the four encoded ones as its misses.
    assert (backend.images.hits["features"], backend.images.misses["features"]) == (1, 4)
    while len(batch):
        batch.decode_step()
    assert [sink.text for sink in sinks] == [text for text, _ in expected]


def test_a_picture_cached_by_an_earlier_request_is_not_encoded_again(backend):
    first, second = request("purple", (120, 80), 8), request("orange", (80, 120), 8)
    backend.images = type(backend.images)(16)
    run_alone(backend.new_batch(1), first, Sink())  # caches the first picture's features
    again = dataclasses.replace(first, task=Task.QUERY, question="What is it?")
    batch = backend.new_batch(4)
    sinks = [Sink(), Sink()]
    batch.join(again, sinks[0])
    batch.join(second, sinks[1])
    with counted(backend) as calls:
        batch.prefill_step()
    assert [pictures for pictures, _ in calls["vision"]] == [1], calls["vision"]  # the second picture only
    assert backend.images.hits["features"] >= 1
    while len(batch):
        batch.decode_step()
    assert [sink.text for sink in sinks] == [alone(backend, again)[0], alone(backend, second)[0]]


def test_a_request_ended_before_the_prefill_and_one_ended_by_its_first_token_leave_the_others_right(backend):
    """A request whose RPC ended before the step runs none of it (it is not in the model's pass and
    writes nothing); one that asks for one token ends at it and takes no row; the others decode as
    alone."""
    cancelled = request("red", (96, 64), 20, cached=False)
    one = request("green", (64, 64), 1, cached=False)
    kept = [request("blue", (200, 90), 15, cached=False), request("yellow", (90, 200), 10, "Colour?", cached=False)]
    batch = backend.new_batch(8)
    sinks = {"cancelled": Sink(stop=True), "one": Sink(), "kept": [Sink(), Sink()]}
    batch.join(cancelled, sinks["cancelled"])
    batch.join(one, sinks["one"])
    for req, sink in zip(kept, sinks["kept"], strict=True):
        batch.join(req, sink)
    with counted(backend) as calls:
        results = dict((id(sink), (outcome, joined)) for sink, outcome, joined in batch.prefill_step())
    outcome, joined = results[id(sinks["cancelled"])]
    assert joined and outcome.completion_tokens == 0 and sinks["cancelled"].pieces == []
    assert calls["text"][0][0] == 3, "the cancelled request went through the model"
    outcome, joined = results[id(sinks["one"])]
    assert joined and outcome is not None and outcome.completion_tokens == 1
    assert len(batch) == 2
    while len(batch):
        batch.decode_step()
    assert [sink.text for sink in sinks["kept"]] == [alone(backend, r)[0] for r in kept]
    assert sinks["one"].text == alone(backend, one)[0]


def test_a_failed_batched_prefill_takes_out_its_requests_and_leaves_the_rows_decoding(backend):
    running = request("red", (96, 64), 30, cached=False)
    batch = backend.new_batch(8)
    first = Sink()
    batch.join(running, first)
    batch.prefill_step()
    assert len(batch) == 1
    joiners = [Sink(), Sink()]
    batch.join(request("blue", (200, 90), 10, cached=False), joiners[0])
    batch.join(request("green", (64, 64), 10, cached=False), joiners[1])
    assert batch.next_prefill == joiners

    with vision_fails(backend), pytest.raises(RuntimeError, match="boom"):
        batch.prefill_step()
    assert batch.joining == 0 and len(batch) == 1 and not any(sink.pieces for sink in joiners)
    while len(batch):
        batch.decode_step()
    assert first.text == alone(backend, running)[0]


def test_a_query_about_several_pictures_is_prefilled_in_a_step_of_its_own(backend):
    """Its prefill is its own, never in another request's step: a failure of the others' prefill leaves
    it decoding, and it answers as alone."""
    two = dataclasses.replace(
        request("red", (96, 64), 12, "What colour is the shape?", cached=False),
        more_images=(shape_image("blue", size=(64, 64)),),
        more_digests=("",),
    )
    others = [request("blue", (200, 90), 10, cached=False), request("green", (64, 64), 10, cached=False)]
    batch = backend.new_batch(8)
    sinks = [Sink() for _ in range(4)]
    batch.join(others[0], sinks[0])
    batch.join(two, sinks[1])
    batch.join(others[1], sinks[2])
    assert batch.next_prefill == [sinks[0], sinks[2]]  # the others first, together
    batch.prefill_step()
    assert batch.joining == 1 and batch.next_prefill == [sinks[1]]
    batch.prefill_step()
    assert batch.joining == 0 and len(batch) == 3
    batch.join(others[1], sinks[3])
    batch.join(two, several := Sink())
    assert batch.next_prefill == [sinks[3]]

    with vision_fails(backend), pytest.raises(RuntimeError, match="boom"):
        batch.prefill_step()
    assert batch.next_prefill == [several]
    batch.prefill_step()
    while len(batch):
        batch.decode_step()
    assert sinks[1].text == several.text == alone(backend, two)[0] and several.text
    assert not sinks[3].pieces
