"""The demo checkpoints see: trained on synthetic shapes, their answers depend on the image, which
proves the pixels reach the model the right way round (channel order, resizing, alpha)."""

from __future__ import annotations

import random
import unicodedata

import pytest
from PIL import Image, ImageDraw

from tests.helpers import caption_request, keep_up, png_bytes, query_request
from vlm.v1 import vlm_service_pb2 as pb
from vlm_checkpoints import shapes

OTHER_COLOURS = {c: [o for o in shapes.COLOURS if o != c] for c in shapes.COLOURS}


def text_of(messages):
    return "".join(m.text for m in messages)


@pytest.fixture
def families_stub(families_server):
    with families_server.channel() as channel:
        yield families_server.stub(channel)


@pytest.mark.parametrize("model", ["tiny-smolvlm", "tiny-qwen2-vl", "tiny-moondream"])
@pytest.mark.parametrize("colour", list(shapes.COLOURS))
def test_captions_name_the_colour(families_stub, model, colour):
    rng = random.Random(f"{model}-{colour}")
    for shape in shapes.SHAPES:
        image = shapes.draw(shapes.Scene(colour, shape, "white"), rng)
        caption = text_of(families_stub.Caption(caption_request(image, model=model, max_new_tokens=40)))
        words = caption.lower().replace(".", " ").split()
        assert colour in words, f"{model} captioned a {colour} {shape} as {caption!r}"
        assert not set(OTHER_COLOURS[colour]) & set(words), caption


def held_out_accuracy(stub, model, count=42, seed=2024):
    rng = random.Random(seed)
    right = 0
    for scene in shapes.scenes(rng, count):
        image = shapes.draw(scene, rng)
        answer = text_of(stub.Query(query_request(shapes.COLOUR_QUESTION, image, model=model, max_new_tokens=20)))
        right += answer == scene.answer(shapes.COLOUR_QUESTION)
    return right / count


@pytest.mark.parametrize("model", ["tiny-smolvlm", "tiny-qwen2-vl", "tiny-moondream"])
def test_colour_question_on_a_held_out_set(families_stub, model):
    accuracy = held_out_accuracy(families_stub, model)
    print(f"{model}: 'What colour is the shape?' exact-answer accuracy on 42 held-out images: {accuracy:.0%}")
    assert accuracy >= 0.8


def test_alpha_is_composited_on_white_before_the_model(families_stub):
    image = Image.new("RGBA", (96, 96), (0, 0, 0, 0))  # transparent black background
    ImageDraw.Draw(image).ellipse((20, 20, 76, 76), fill=(220, 30, 30, 255))
    caption = text_of(families_stub.Caption(caption_request(png_bytes(image), model="tiny-smolvlm")))
    assert "red" in caption and "white background" in caption, caption


def test_bgr_swap_would_be_caught(families_stub):
    """A red image and the same image with channels swapped (blue) get different colour words."""
    rng = random.Random(5)
    red = shapes.draw(shapes.Scene("red", "circle", "white"), rng)
    swapped = Image.merge("RGB", red.split()[::-1])
    answers = [
        text_of(families_stub.Query(query_request(shapes.COLOUR_QUESTION, image, model="tiny-smolvlm")))
        for image in (red, swapped)
    ]
    assert answers == ["The shape is red.", "The shape is blue."]


def is_cjk(ch: str) -> bool:
    return unicodedata.name(ch, "").startswith(("CJK", "HIRAGANA", "KATAKANA", "HANGUL"))


@pytest.mark.parametrize(("language", "colour_word"), [("ja", "赤い"), ("zh", "红色"), ("ko", "빨간")])
def test_qwen_answers_in_the_requested_language_in_small_messages(
    families_stub, families_server, language, colour_word
):
    """Spaceless scripts stream in small pieces. Granularity is defined for a reader that keeps up, so
    the scheduler is paced to the RPC (the ``keep_up`` step gate): text never piles up unread here."""
    rng = random.Random(language)
    image = shapes.draw(shapes.Scene("red", "circle", "white"), rng)
    scheduler = families_server.engine.models["tiny-qwen2-vl"].scheduler
    scheduler.step_gate = keep_up
    try:
        request = caption_request(image, model="tiny-qwen2-vl", response_language=language)
        messages = list(families_stub.Caption(request))
    finally:
        scheduler.step_gate = None
    text = text_of(messages)
    pieces = [m.text for m in messages if m.text]
    assert colour_word in text, text
    assert sum(map(is_cjk, text)) >= len(text) // 2, f"not {language}: {text!r}"
    chars_per_message = len(text) / len(pieces)
    print(
        f"qwen2-vl {language}: {len(text)} characters in {len(pieces)} messages ({chars_per_message:.2f} per message)"
    )
    assert len(pieces) >= len(text) / 3, f"text came in bursts: {pieces}"
    assert messages[-1].finish_reason == pb.FINISH_REASON_STOP


def test_exif_rotated_jpeg_reaches_the_model_upright(families_stub, families_server, monkeypatch):
    """A JPEG stored sideways with an EXIF orientation tag is rotated before the model sees it."""
    import io

    rng = random.Random(9)
    upright = shapes.draw(shapes.Scene("blue", "square", "white"), rng).resize((120, 60))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the camera wrote: 60x120
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", quality=95, exif=exif)
    backend = families_server.engine.models["tiny-smolvlm"].backend
    seen = []
    original = backend.prepare
    monkeypatch.setattr(backend, "prepare", lambda request: seen.append(request.image.size) or original(request))
    answer = text_of(families_stub.Query(query_request_bytes(buffer.getvalue(), shapes.COLOUR_QUESTION)))
    # Upright (landscape, as displayed), and reduced to the longest edge the model's processor uses.
    longest = backend.processor.image_processor.size["longest_edge"]
    assert seen == [(longest, longest // 2) if longest < 120 else (120, 60)], "the model must see the image upright"
    assert answer == "The shape is blue."


def query_request_bytes(data: bytes, question: str) -> pb.QueryRequest:
    return pb.QueryRequest(model="tiny-smolvlm", image=pb.Image(data=data), question=question)
