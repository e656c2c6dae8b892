"""The image cache: a Caption then Queries on one image pay for its preprocessing and vision encoder
once, and what the cache gives back is exactly what a fresh computation gives."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import caption_request, png_bytes, query_request, shape_image
from vlm.v1 import vlm_service_pb2 as pb
from vlm_service.core.text import clean_answer
from vlm_service.images.decode import image_digest
from vlm_service.types import GenerationRequest, SamplingParams, Task


def prefill(backend, request: GenerationRequest, inputs):
    """The whole prefill at once: every chunk of ``prefill_steps``, then what it returns."""
    steps = backend.prefill_steps(request, inputs)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def request_for(name: str, image, digest: str, question: str = "What colour is the shape?") -> GenerationRequest:
    return GenerationRequest("t", name, Task.QUERY, image, SamplingParams(8), question, image_digest=digest)


@pytest.mark.parametrize("name", ["tiny-smolvlm", "tiny-qwen2-vl"])
def test_cached_preprocessing_and_vision_features_equal_fresh_ones(families_server, name):
    backend = families_server.engine.models[name].backend
    image = shape_image("purple", size=(130, 70))
    digest = f"test-{name}-purple"
    fresh_request = request_for(name, image, "")  # no digest: never cached
    with torch.inference_mode():
        fresh_inputs = backend.prepare(fresh_request)
        fresh_logits, _, fresh_position = prefill(backend, fresh_request, fresh_inputs)

        hits = dict(backend.images.hits)
        first = backend.prepare(request_for(name, image, digest))
        prefill(backend, request_for(name, image, digest), first)
        # Another question on the same image: its prompt differs, its image part comes from the cache.
        other = request_for(name, image, digest, "What shape is it?")
        cached_inputs = backend.prepare(other)
        cached_logits, _, cached_position = prefill(backend, other, cached_inputs)
        again = backend.prepare(request_for(name, image, digest))
        again_logits, _, again_position = prefill(backend, request_for(name, image, digest), again)

    assert backend.images.hits["preprocessing"] - hits.get("preprocessing", 0) == 2
    assert backend.images.hits["features"] - hits.get("features", 0) == 2
    # Once the features are cached, the pixels they came from are not kept: the rest is identical.
    encoder_only = set(type(backend).encoder_only_inputs)
    assert set(again) == set(fresh_inputs) - encoder_only
    assert set(first) == set(fresh_inputs), "the first request still needs its pixels"
    for key in again:
        assert torch.equal(again[key], fresh_inputs[key]), key
    assert not torch.equal(cached_inputs["input_ids"], fresh_inputs["input_ids"]), "the question is not cached"
    assert torch.allclose(again_logits, fresh_logits, atol=1e-5) and again_position == fresh_position
    assert cached_position == cached_inputs["input_ids"].shape[1] + (
        fresh_position - fresh_inputs["input_ids"].shape[1]
    )


@pytest.mark.parametrize("name", ["tiny-smolvlm", "tiny-qwen2-vl", "tiny-moondream"])
def test_a_query_after_a_caption_on_the_same_image_reuses_it_and_answers_the_same(families_server, name):
    backend = families_server.engine.models[name].backend
    image = shape_image("green", size=(88, 120))
    data = png_bytes(image)
    kind = "encoded" if name == "tiny-moondream" else "features"
    with families_server.channel() as channel:
        stub = families_server.stub(channel)
        list(stub.Caption(caption_request(data, model=name, max_new_tokens=12)))
        hits = backend.images.hits[kind]
        messages = list(stub.Query(query_request("What colour is the shape?", image, model=name, max_new_tokens=12)))
    assert backend.images.hits[kind] == hits + 1
    text = "".join(m.text for m in messages)
    assert messages[-1].finish_reason == pb.FINISH_REASON_STOP
    # The same answer as a request that computes everything afresh (no digest, so no cache).
    if name == "tiny-moondream":
        settings = {"temperature": 0.0, "max_tokens": 12}
        fresh = backend.model.query(backend.model.encode_image(image), "What colour is the shape?", settings=settings)
        expected = clean_answer(fresh["answer"])[0]
    else:
        request = request_for(name, image, "")
        inputs = backend.prepare(request)
        with torch.inference_mode():
            output = backend.model.generate(**inputs, max_new_tokens=12, do_sample=False)
        raw = backend.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        expected = clean_answer(raw, (), type(backend).role_prefixes)[0]
    assert text == expected == "The shape is green."


def test_the_digest_is_of_the_bytes():
    a, b = png_bytes(shape_image("red")), png_bytes(shape_image("blue"))
    assert image_digest(a) == image_digest(bytes(a))
    assert image_digest(a) != image_digest(b)
