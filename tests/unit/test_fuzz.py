"""Property-based fuzzing (hypothesis) of what a client controls: image bytes and request fields.
Whatever comes in, the result is a decoded RGB image / a validated request, or InvalidInput:
never another exception. Bounded: a fixed number of examples, no deadline surprises in CI."""

from __future__ import annotations

import io

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from vlm.v1 import vlm_service_pb2 as pb
from vlm_service.api import convert
from vlm_service.config import Settings
from vlm_service.errors import InvalidInput
from vlm_service.images.decode import decode_image

LIMITS = {"max_bytes": 200_000, "max_pixels": 1_000_000}


def _valid_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _valid_png()


def _check_image(data: bytes) -> None:
    try:
        image = decode_image(data, **LIMITS)
    except InvalidInput as error:
        assert error.violations[0].field == "image.data"
        return
    assert image.mode == "RGB" and image.width * image.height <= LIMITS["max_pixels"]


@given(st.binary(max_size=4096))
@settings(max_examples=300, deadline=None)
def test_random_bytes_decode_or_are_rejected(data):
    _check_image(data)


@given(
    st.lists(st.tuples(st.integers(0, len(PNG) - 1), st.integers(0, 255)), min_size=1, max_size=8),
    st.integers(8, len(PNG)),
)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_mutated_and_truncated_pngs_decode_or_are_rejected(flips, cut):
    data = bytearray(PNG)
    for position, value in flips:
        data[position] = value
    _check_image(bytes(data[:cut]))


@given(st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "WEBP"]), st.binary(min_size=1, max_size=64))
@settings(max_examples=100, deadline=None)
def test_valid_headers_with_garbage_bodies(fmt, garbage):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format=fmt)
    data = buffer.getvalue()
    _check_image(data[: len(data) // 2] + garbage)


floats = st.floats(allow_nan=True, allow_infinity=True, width=32)


@given(
    max_new_tokens=st.integers(0, 2**32 - 1),
    temperature=floats,
    top_p=floats,
    top_k=st.integers(0, 2**32 - 1),
    repetition_penalty=floats,
    stop=st.lists(st.text(max_size=80), max_size=12),
    seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
    length=st.integers(-5, 10),
    question=st.text(max_size=200),
    language=st.text(max_size=8),
)
@settings(max_examples=300, deadline=None)
def test_request_validation_accepts_or_names_the_field(
    max_new_tokens, temperature, top_p, top_k, repetition_penalty, stop, seed, length, question, language
):
    options = pb.GenerationOptions(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        stop=stop,
    )
    if seed is not None:
        options.seed = seed
    image = pb.Image(data=PNG)
    requests = [
        (
            convert.caption_request,
            pb.CaptionRequest(image=image, options=options, length=length, response_language=language),
        ),
        (
            convert.query_request,
            pb.QueryRequest(image=image, options=options, question=question, response_language=language),
        ),
    ]
    for to_domain, message in requests:
        try:
            request = to_domain(message, Settings())
        except InvalidInput as error:
            assert error.violations[0].field
            continue
        params = request.params
        assert params.temperature >= 0 and 0 < params.top_p <= 1 and params.repetition_penalty > 0
        assert params.max_new_tokens <= Settings().max_new_tokens_limit
