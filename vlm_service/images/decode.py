"""Request images: bytes in, a safe RGB ``PIL.Image`` out (or :class:`InvalidInput` saying what is
wrong), decoded off the event loop and off the model's cores, with bounded concurrency.

Checks (:func:`decode_image`), in order: size in bytes; format by content (an allowlist); dimensions
from the header, before any pixel is decoded (decompression bombs are refused without allocating); a
full decode (truncated files fail here); EXIF orientation; conversion to RGB with alpha composited on
white. Given the model's :class:`~vlm_service.types.ImageBound`, a bigger picture is reduced to it
right after decoding (a JPEG is even decoded at 1/2, 1/4 or 1/8 scale when that still covers it:
Pillow's ``draft``), so nothing downstream touches more pixels than the model uses. The pixel limit is
the service's own (``max_pixels``): Pillow's process-wide bomb limit is turned off when this module is
imported, so a configured limit above it is honoured and a refusal quotes the limit that refused it.

:class:`ImageDecoder` runs all of that in a pool of decoding processes at a lower CPU priority (nice
+10), never on the event loop or in the server's process: a flood of big pictures can neither hold
the GIL that health checks and running streams need, nor take the cores of the model's torch threads
(docs/performance.md has the measurements, and what was tried first). A thread per decode
(``workers`` of them) waits for its process, so at most ``workers`` images are decoded at once; up to
``max_waiting`` more requests wait for a thread (holding only the bytes they arrived with), and a
request beyond that gets RESOURCE_EXHAUSTED at once. Hashing the bytes for the image cache runs in the
thread (hashlib releases the GIL).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import multiprocessing
import os
import threading
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from vlm_service.config import Settings
from vlm_service.errors import InvalidInput, QueueFull
from vlm_service.types import ImageBound

logger = logging.getLogger(__name__)


def image_digest(data: bytes) -> str:
    """The image cache's key: a hash of the bytes (decoding is deterministic: equal bytes, equal image)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


#: The name prefix of the decoding threads (the pool starts them as load needs, up to ``workers``).
THREAD_PREFIX = "vlm-decode"
#: How much lower than the server's the decoding processes' CPU priority is (``nice`` increment).
NICENESS = 10


def _lower_priority() -> None:
    """A decoding process's initializer: yield the CPU to the server's threads (the model's above all)."""
    os.nice(NICENESS)


def _processes(workers: int) -> ProcessPoolExecutor:
    """``workers`` decoding processes, forked from a fresh interpreter (forkserver: never from this
    process, whose gRPC and torch threads do not survive a fork), started now rather than on the first
    picture."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["vlm_service.images.decode"])
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_lower_priority)
    for _ in range(workers):
        pool.submit(os.getpid)
    return pool


def decode_in_pool(data: bytes, *, processes: Executor | None = None, **limits) -> Image.Image:
    """:func:`decode_image` in ``processes`` (one of the decoding processes; None: here)."""
    if processes is None:
        return decode_image(data, **limits)
    return processes.submit(decode_image, data, **limits).result()


class ImageDecoder:
    """Decodes request images in a thread pool; ``await decode(data)`` from the event loop."""

    def __init__(self, *, workers: int, max_waiting: int, max_bytes: int, max_pixels: int):
        self.workers = workers
        self._limit = workers + max_waiting
        self._max_bytes = max_bytes
        self._max_pixels = max_pixels
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=THREAD_PREFIX)
        self._processes = _processes(workers)
        self._processes_lock = threading.Lock()
        self.admitted = 0  # requests decoding or waiting for a thread (touched on the event loop only)

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageDecoder:
        """The server's decoder: ``--max-image-decodes`` processes, as many waiting as ``--max-streams``,
        and the byte and pixel caps."""
        return cls(
            workers=settings.max_image_decodes,
            max_waiting=settings.max_streams,
            max_bytes=settings.max_image_bytes,
            max_pixels=settings.max_image_pixels,
        )

    async def decode(self, data: bytes, bound: ImageBound | None = None) -> tuple[Image.Image, str]:
        """The decoded RGB image (reduced to within ``bound``, the largest picture its model uses) and
        the digest of its bytes, or InvalidInput; QueueFull at once when too many wait."""
        if self.admitted >= self._limit:
            raise QueueFull(
                f"{self.admitted} images are being decoded or wait for it (the limit); retry shortly", retry_after=0.5
            )
        self.admitted += 1
        try:
            # Cancelling the RPC cancels a decode that has not started; one that has runs to its end.
            return await asyncio.get_running_loop().run_in_executor(self._pool, self._decode, data, bound)
        finally:
            self.admitted -= 1

    def _decode(self, data: bytes, bound: ImageBound | None) -> tuple[Image.Image, str]:
        processes = self._processes
        limits = {"max_bytes": self._max_bytes, "max_pixels": self._max_pixels, "bound": bound}
        try:
            image = decode_in_pool(data, processes=processes, **limits)
        except BrokenProcessPool:
            # A decoding process died (killed: out of memory, a signal). This request fails as an
            # internal error (with an id in the log); the next ones get new processes.
            with self._processes_lock:
                if self._processes is processes:
                    logger.error("a decoding process died; starting new ones")
                    self._processes = _processes(self.workers)
                    processes.shutdown(wait=False, cancel_futures=True)
            raise
        return image, image_digest(data)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._processes.shutdown(wait=False, cancel_futures=True)


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
