"""Image bytes in, a safe RGB ``PIL.Image`` out, or :class:`InvalidInput` saying what is wrong.

Checks, in order: size in bytes; format by content (an allowlist); dimensions from the header, before
any pixel is decoded (decompression bombs are refused without allocating); a full decode (truncated
files fail here); EXIF orientation; conversion to RGB with alpha composited on white.

Given the model's :class:`~vlm_service.types.ImageBound`, a bigger picture is reduced to it here, right
after decoding (a JPEG is even decoded at 1/2, 1/4 or 1/8 scale when that is still big enough: Pillow's
``draft``), so nothing downstream (the processor, the model's thread) touches more pixels than the
model uses.

The pixel limit is the service's own (``max_pixels``), checked from the header: Pillow's process-wide
decompression-bomb limit (about 89.5 megapixels, an error above twice that) is turned off when this
module is imported, so a configured limit above it is honoured and a refusal quotes the limit that
refused it.
"""

from __future__ import annotations

import io

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import InvalidInput
from .types import ImageBound

# The header check below is the only pixel limit (see the module's docstring).
Image.MAX_IMAGE_PIXELS = None

#: Formats accepted, as Pillow names them. Checked from the content, never from a file name.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")

FIELD = "image.data"


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int, bound: ImageBound | None = None) -> Image.Image:
    """The picture in ``data`` as RGB, within ``bound`` when one is given; InvalidInput if it is refused."""
    if not data:
        raise InvalidInput(FIELD, "the image is empty; send the encoded file's bytes")
    if len(data) > max_bytes:
        raise InvalidInput(FIELD, f"the image is {len(data)} bytes; the limit is {max_bytes}")
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise InvalidInput(FIELD, f"not a supported image; accepted formats are {', '.join(ALLOWED_FORMATS)}") from None
    except Exception:
        raise InvalidInput(FIELD, "the image header cannot be read") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidInput(FIELD, f"the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise InvalidInput(FIELD, f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
    try:
        image.seek(0)  # first frame of an animation
        if bound is not None and image.format == "JPEG":
            target = bound.fit(width, height)
            if target != (width, height):
                image.draft(None, target)  # the smallest DCT scale whose picture is still >= target
        image.load()
        image = ImageOps.exif_transpose(image)
        if bound is not None:
            image = reduce_to(image, bound)
        return to_rgb(image)
    except Exception:
        raise InvalidInput(FIELD, f"the {image.format} image is truncated or corrupt") from None


#: Modes that resize as they are (alpha premultiplied by Pillow); others are made RGB first.
_RESIZABLE_MODES = ("RGB", "RGBA", "L", "LA")


def reduce_to(image: Image.Image, bound: ImageBound) -> Image.Image:
    """``image`` shrunk to within ``bound`` (aspect ratio kept), or unchanged if it is within it already.
    Pillow's ``reducing_gap`` first reduces by a whole factor (a box filter, fast), then resamples."""
    target = bound.fit(*image.size)
    if target == image.size:
        return image
    if image.mode not in _RESIZABLE_MODES:
        image = to_rgb(image)
    return image.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)


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
