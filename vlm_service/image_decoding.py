"""Image decoding off the event loop and off the model's cores, with bounded concurrency.

Everything whose cost a request chooses (decoding, the header and pixel checks, EXIF rotation, the
reduction to the largest picture the model uses, alpha compositing) runs in a pool of decoding
processes at a lower CPU priority (nice +10), never on the event loop or in the server's process:

- a flood of big pictures cannot delay health checks or the messages of running streams through the
  GIL (the processes have their own);
- the model's torch threads keep their cores: a 36-megapixel PNG takes a core for 0.7 s, and a torch
  thread that loses its core to it holds up every parallel region of the model (its OpenMP team waits
  for it), so a running stream's step took up to 1.5 s at SmolVLM-256M size while four such pictures
  were decoded at normal priority. At nice +10 the decoders get what the model leaves.

Tried and dropped: the same priority for decoding *threads*. A thread that holds the GIL while the
kernel starves it stalls every other thread of the server (a running stream's longest gap during a
flood grew from 42-71 ms to 185-187 ms with the tiny model). Processes hold no lock the server needs.

A thread per decode (``workers`` of them) waits for its process, so at most ``workers`` images are
decoded at once; up to ``max_waiting`` more requests wait for a thread (holding only the bytes they
arrived with), and a request beyond that gets RESOURCE_EXHAUSTED at once. Hashing the bytes for the
image cache runs in the thread (hashlib releases the GIL).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import multiprocessing
import os
import threading
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from PIL import Image

from . import images
from .errors import QueueFull
from .types import ImageBound

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
    context.set_forkserver_preload(["vlm_service.images"])
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_lower_priority)
    for _ in range(workers):
        pool.submit(os.getpid)
    return pool


def decode_image(data: bytes, *, processes: Executor | None = None, **limits) -> Image.Image:
    """:func:`images.decode_image` in ``processes`` (one of the decoding processes; None: here)."""
    if processes is None:
        return images.decode_image(data, **limits)
    return processes.submit(images.decode_image, data, **limits).result()


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
            image = decode_image(data, processes=processes, **limits)
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
