"""What the benches share that needs only the standard library and Pillow, so that the OpenVINO
reference (bench/openvino_reference.py, in a venv of its own) uses the same pictures and the same
one-tile copy of the twin as the other benches."""

from __future__ import annotations

import io
import json
from collections.abc import Collection
from pathlib import Path

from PIL import Image, ImageDraw


def picture(index: int, size: tuple[int, int]) -> Image.Image:
    """Picture number ``index``: the same size and look, a different pixel (so a different cache key)."""
    width, height = size
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).ellipse((width // 4, height // 4, width * 3 // 4, height * 3 // 4), fill="red")
    pixel = (index % width, index // width % height)
    image.putpixel(pixel, (index * 7 % 256, index * 13 % 256, index * 29 % 256))
    return image


def png(index: int, size: tuple[int, int]) -> bytes:
    """:func:`picture` number ``index`` as PNG bytes."""
    buffer = io.BytesIO()
    picture(index, size).save(buffer, format="PNG")
    return buffer.getvalue()


def single_view_copy(twin: Path, into: Path, keep_out: Collection[str] = ()) -> Path:
    """The twin with its processor's single-view path (one 512-px view, no 4x4 split): the same weights
    (linked), ``do_image_splitting`` off, as tests/integration/test_real_size.py serves it. The files
    named in ``keep_out`` are left for the caller to write (converted)."""
    view = into / "smolvlm-256m-one-tile"
    view.mkdir()
    for path in twin.iterdir():
        if path.name != "processor_config.json" and path.name not in keep_out:
            (view / path.name).symlink_to(path)
    config = json.loads((twin / "processor_config.json").read_text())
    config["image_processor"]["do_image_splitting"] = False
    (view / "processor_config.json").write_text(json.dumps(config))
    return view
