"""Image decoding off the event loop, with bounded concurrency.

Everything whose cost a request chooses (decoding, the header and pixel checks, EXIF rotation, the
reduction to the largest picture the model uses, alpha compositing, hashing the bytes for the image
cache) runs in a small pool of threads, never on the
event loop: a flood of big pictures cannot delay health checks or the messages of running streams.
At most ``workers`` images are decoded at once, so at most that many decoded pictures are being made;
up to ``max_waiting`` more requests wait for a thread (holding only the bytes they arrived with), and a
request beyond that gets RESOURCE_EXHAUSTED at once.

Tried and dropped: running the pool's threads at a lower CPU priority (nice 10). A thread that holds
the GIL while the scheduler starves it stalls every other thread: the longest gap of a running stream
during a flood of 36-megapixel pictures grew from 42-71 ms to 185-187 ms.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from .errors import QueueFull
from .images import decode_image
from .types import ImageBound

logger = logging.getLogger(__name__)


def image_digest(data: bytes) -> str:
    """The image cache's key: a hash of the bytes (decoding is deterministic: equal bytes, equal image)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


#: The name prefix of the decoding threads (the pool starts them as load needs, up to ``workers``).
THREAD_PREFIX = "vlm-decode"


class ImageDecoder:
    """Decodes request images in a thread pool; ``await decode(data)`` from the event loop."""

    def __init__(self, *, workers: int, max_waiting: int, max_bytes: int, max_pixels: int):
        self.workers = workers
        self._limit = workers + max_waiting
        self._max_bytes = max_bytes
        self._max_pixels = max_pixels
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=THREAD_PREFIX)
        self.admitted = 0  # requests decoding or waiting for a thread (touched on the event loop only)

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
        image = decode_image(data, max_bytes=self._max_bytes, max_pixels=self._max_pixels, bound=bound)
        return image, image_digest(data)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
