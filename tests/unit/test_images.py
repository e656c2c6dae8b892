"""Image decoding: formats by content, caps before decoding, orientation and colour conversion."""

from __future__ import annotations

import asyncio
import io
import struct
import zlib
from concurrent.futures.process import BrokenProcessPool

import pytest
from PIL import Image, ImageDraw
from PIL.JpegImagePlugin import JpegImageFile

from tests.helpers import wait_for
from vlm_service.errors import InvalidInput
from vlm_service.images.decode import decode_image
from vlm_service.types import ImageBound

LIMITS = {"max_bytes": 5_000_000, "max_pixels": 10_000_000}


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_allowed_formats_decode_to_rgb(fmt):
    image = decode_image(encode(Image.new("RGB", (40, 30), (200, 10, 10)), fmt), **LIMITS)
    assert image.mode == "RGB" and image.size == (40, 30)
    r, g, b = image.getpixel((20, 15))
    assert r > 150 and g < 80 and b < 80


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"", "empty"),
        (b"definitely not an image", "not a supported image"),
        (encode(Image.new("RGB", (10, 10)), "TIFF"), "not a supported image"),
    ],
)
def test_rejected_inputs_say_why(data, needle):
    with pytest.raises(InvalidInput) as info:
        decode_image(data, **LIMITS)
    assert needle in str(info.value)
    assert info.value.violations[0].field == "image.data"


def test_truncated_file_is_rejected():
    data = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG")
    with pytest.raises(InvalidInput, match="truncated or corrupt"):
        decode_image(data[: len(data) // 2], **LIMITS)


def test_byte_cap():
    data = encode(Image.new("RGB", (10, 10)), "PNG")
    with pytest.raises(InvalidInput, match="bytes; the limit is"):
        decode_image(data, max_bytes=len(data) - 1, max_pixels=10**6)


def test_pixel_cap_is_checked_from_the_header():
    data = encode(Image.new("1", (4000, 3000)), "PNG")  # 12 Mpx, a few KB on the wire
    assert len(data) < 100_000
    with pytest.raises(InvalidInput, match="4000x3000"):
        decode_image(data, **LIMITS)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), "blue")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    decoded = decode_image(encode(image, "JPEG", exif=exif), **LIMITS)
    assert decoded.size == (20, 40)


def test_alpha_is_composited_on_white():
    image = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    decoded = decode_image(encode(image, "PNG"), **LIMITS)
    assert decoded.getpixel((5, 5)) == (255, 255, 255)


@pytest.mark.parametrize("mode", ["P", "L", "CMYK", "LA", "I;16"])
def test_other_modes_become_rgb(mode):
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    image = Image.new(mode, (8, 8))
    assert decode_image(encode(image, fmt), **LIMITS).mode == "RGB"


def test_a_truncated_jpeg_is_rejected_not_served_half_grey():
    """Pillow can fill a cut JPEG's missing rows with grey (LOAD_TRUNCATED_IMAGES); the service refuses it."""
    data = encode(Image.effect_noise((128, 128), 60).convert("RGB"), "JPEG", quality=90)
    with pytest.raises(InvalidInput, match="JPEG image is truncated or corrupt"):
        decode_image(data[: len(data) * 2 // 3], **LIMITS)


def test_an_animated_gif_is_its_first_frame():
    frames = [Image.new("RGB", (16, 12), colour) for colour in ((200, 0, 0), (0, 200, 0), (0, 0, 200))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    decoded = decode_image(buffer.getvalue(), **LIMITS)
    assert decoded.size == (16, 12) and decoded.getpixel((8, 6)) == (200, 0, 0)


@pytest.mark.parametrize(
    ("mode", "value", "fmt", "expected"),
    [
        ("I;16", 0xFFFF, "PNG", (255, 255, 255)),  # 16-bit white stays white (not clipped to 255/65535)
        ("I;16", 0x8000, "PNG", (128, 128, 128)),  # the top 8 bits
        ("L", 77, "PNG", (77, 77, 77)),
        ("CMYK", (0, 255, 255, 0), "JPEG", (255, 0, 0)),  # no cyan and black, full magenta and yellow: red
    ],
)
def test_the_pixel_values_of_16_bit_grayscale_and_cmyk_pictures(mode, value, fmt, expected):
    decoded = decode_image(encode(Image.new(mode, (8, 8), value), fmt), **LIMITS)
    assert all(abs(got - want) <= 3 for got, want in zip(decoded.getpixel((4, 4)), expected, strict=True)), (
        decoded.getpixel((4, 4))
    )


# --- reduction to the model's bound, and the pixel limit -------------------------------------------


def png_header(width: int, height: int) -> bytes:
    """A PNG that is only its header (IHDR, then IEND): the size is known without any pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("bound", "size"),
    [(ImageBound(longest_edge=1000), (1000, 666)), (ImageBound(pixels=300_000), (670, 447))],
)
def test_a_picture_over_its_models_bound_is_reduced_to_it(bound, size):
    image = Image.new("RGB", (3000, 2000), "white")
    ImageDraw.Draw(image).ellipse((1000, 500, 2000, 1500), fill=(200, 10, 10))
    decoded = decode_image(encode(image, "PNG"), **LIMITS, bound=bound)
    assert decoded.size == size and decoded.mode == "RGB"
    assert decoded.getpixel((size[0] // 2, size[1] // 2)) == (200, 10, 10)  # the shape is where it was
    assert decoded.getpixel((5, 5)) == (255, 255, 255)


def test_a_picture_within_its_bound_is_left_as_it_is():
    data = encode(Image.effect_noise((300, 200), 60).convert("RGB"), "PNG")
    alone = decode_image(data, **LIMITS)
    bounded = decode_image(data, **LIMITS, bound=ImageBound(longest_edge=300, pixels=60_000))
    assert bounded.size == (300, 200) and bounded.tobytes() == alone.tobytes()


def test_a_big_jpeg_is_decoded_at_a_reduced_scale(monkeypatch):
    """Pillow's draft: the JPEG decoder itself produces 1/8 of each side when that still covers the bound,
    so the full-size picture is never made."""
    decoded_sizes = []
    real_draft = JpegImageFile.draft

    def draft(self, mode, size):
        result = real_draft(self, mode, size)
        decoded_sizes.append(self.size)  # what load() will decode
        return result

    monkeypatch.setattr(JpegImageFile, "draft", draft)
    data = encode(Image.new("RGB", (4000, 3000), (10, 200, 10)), "JPEG")
    decoded = decode_image(data, max_bytes=5_000_000, max_pixels=20_000_000, bound=ImageBound(longest_edge=500))
    assert decoded_sizes == [(500, 375)]
    assert decoded.size == (500, 375)


def test_reduction_keeps_the_orientation_and_composites_alpha():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    rotated = decode_image(
        encode(Image.new("RGB", (2000, 1000), "blue"), "JPEG", exif=exif), **LIMITS, bound=ImageBound(longest_edge=400)
    )
    assert rotated.size == (200, 400)
    clear = decode_image(
        encode(Image.new("RGBA", (2000, 1000), (255, 0, 0, 0)), "PNG"), **LIMITS, bound=ImageBound(longest_edge=400)
    )
    assert clear.size == (400, 200) and clear.getpixel((100, 100)) == (255, 255, 255)
    palette = Image.new("P", (2000, 1000))
    palette.putpalette([0, 0, 255] * 256)
    assert decode_image(encode(palette, "PNG"), **LIMITS, bound=ImageBound(longest_edge=400)).getpixel((9, 9)) == (
        0,
        0,
        255,
    )


def test_a_pixel_limit_above_pillows_own_is_honoured():
    """Pillow refuses pictures of more than about 89.5 megapixels on its own; the service's limit is the
    one that counts: 95 megapixels under a 100-megapixel limit decode (reduced to the model's bound)."""
    data = encode(Image.new("L", (10_000, 9_500), 128), "PNG")
    decoded = decode_image(data, max_bytes=5_000_000, max_pixels=100_000_000, bound=ImageBound(longest_edge=1000))
    assert decoded.size == (1000, 950) and decoded.getpixel((10, 10)) == (128, 128, 128)


def test_a_picture_over_the_limit_is_refused_with_its_size_and_the_limit_that_refused_it():
    """Even past twice Pillow's own bomb limit (where Pillow raises rather than warns), the refusal is
    the service's, from the header alone, and says which limit refused it."""
    with pytest.raises(InvalidInput) as info:
        decode_image(png_header(20_000, 10_000), max_bytes=5_000_000, max_pixels=150_000_000)
    assert str(info.value).endswith("the image is 20000x10000 = 200000000 pixels; the limit is 150000000")


# --- the decoding processes (image_decoding.ImageDecoder) ---------------------------------------


@pytest.fixture
def decoder():
    from vlm_service.images.decode import ImageDecoder

    decoder = ImageDecoder(workers=2, max_waiting=4, **LIMITS)
    yield decoder
    decoder.close()


async def test_pictures_are_decoded_in_other_processes_at_a_lower_cpu_priority(decoder):
    """A big picture's decoding must neither hold the server's GIL nor take a core from the model's
    torch threads: it runs in a process of its own, niced below the server (see image_decoding.py)."""
    import os

    from vlm_service.images.decode import NICENESS

    pid, niceness = await asyncio.wrap_future(decoder._processes.submit(_pid_and_niceness))
    assert pid != os.getpid()
    assert niceness == min(19, os.nice(0) + NICENESS)
    image, digest = await decoder.decode(encode(Image.new("RGB", (40, 30), (200, 10, 10)), "PNG"))
    assert image.size == (40, 30) and image.getpixel((0, 0)) == (200, 10, 10) and digest


async def test_a_refusal_in_a_decoding_process_reaches_the_caller_whole(decoder):
    """InvalidInput crosses the process boundary by pickle with its field and description intact."""
    with pytest.raises(InvalidInput) as refused:
        await decoder.decode(b"not a picture at all")
    assert refused.value.field == "image.data" and "not a supported image" in refused.value.description


async def test_a_decoding_process_that_dies_fails_one_request_and_the_next_ones_are_decoded(decoder):
    """A killed decoding process (out of memory, a signal) breaks its pool: the request that meets it
    fails (an internal error for the client), and new processes decode the requests after it."""
    import os
    import signal

    picture = encode(Image.new("RGB", (40, 30), (10, 200, 10)), "PNG")
    pid, _ = await asyncio.wrap_future(decoder._processes.submit(_pid_and_niceness))
    broken = decoder._processes
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: broken._broken, message="the pool never noticed its dead process")
    outcomes = []
    for _ in range(3):
        try:
            outcomes.append((await decoder.decode(picture))[0].getpixel((0, 0)))
        except BrokenProcessPool:
            outcomes.append("broken")
    assert decoder._processes is not broken
    assert outcomes == ["broken", (10, 200, 10), (10, 200, 10)]


def _pid_and_niceness() -> tuple[int, int]:
    import os

    return os.getpid(), os.nice(0)
