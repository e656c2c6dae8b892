"""Image bytes in, a safe RGB ``PIL.Image`` out, or :class:`InvalidInput` saying what is wrong.

Checks, in order: size in bytes; format by content (an allowlist); dimensions from the header, before
any pixel is decoded (decompression bombs are refused without allocating); a full decode (truncated
files fail here); EXIF orientation; conversion to RGB with alpha composited on white.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import InvalidInput

#: Formats accepted, as Pillow names them. Checked from the content, never from a file name.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")

FIELD = "image.data"


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int) -> Image.Image:
    if not data:
        raise InvalidInput(FIELD, "the image is empty; send the encoded file's bytes")
    if len(data) > max_bytes:
        raise InvalidInput(FIELD, f"the image is {len(data)} bytes; the limit is {max_bytes}")
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise InvalidInput(FIELD, f"not a supported image; accepted formats are {', '.join(ALLOWED_FORMATS)}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidInput(FIELD, f"the image has too many pixels; the limit is {max_pixels}") from None
    except Exception:
        raise InvalidInput(FIELD, "the image header cannot be read") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidInput(FIELD, f"the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise InvalidInput(FIELD, f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
    try:
        image.seek(0)  # first frame of an animation
        image.load()
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except Exception:
        raise InvalidInput(FIELD, f"the {image.format} image is truncated or corrupt") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any mode to RGB; transparent pixels become white."""
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda v: v / 256).convert("L")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
