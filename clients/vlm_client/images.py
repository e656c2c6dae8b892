"""Accept an image as a path, bytes, a file object or a PIL image; send the encoded bytes."""

from __future__ import annotations

import io
import os
from typing import IO, Any, Union

ImageLike = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, IO[bytes], Any]


def image_bytes(image: ImageLike) -> bytes:
    """The encoded file bytes of ``image``. PIL images are encoded losslessly as PNG."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as handle:
            return handle.read()
    if hasattr(image, "read"):
        return image.read()
    if hasattr(image, "save") and hasattr(image, "mode"):  # a PIL image, without importing PIL
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    raise TypeError(f"cannot use {type(image).__name__} as an image; give a path, bytes, a file or a PIL image")
