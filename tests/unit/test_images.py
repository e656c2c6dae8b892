"""Image decoding: formats by content, caps before decoding, orientation and colour conversion."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from vlm_service.errors import InvalidInput
from vlm_service.images import decode_image

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
