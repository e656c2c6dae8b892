"""A small per-model cache of what an image costs before decoding: its preprocessing and its vision
features, keyed by a hash of the image's bytes.

A Caption followed by Queries on the same image (or retries of one request) pays for the image
processor and the vision encoder once. Entries are evicted least-recently-used beyond ``capacity``
images; a capacity of 0 turns the cache off.

The preprocessing part hooks the processor's image step (``_process_images`` in transformers 5's
``ProcessorMixin``), which returns the pixel tensors and the text that replaces the image placeholder;
the prompt's text is still tokenized for every request. Once an image's vision features are cached,
its pixel tensors are dropped (:meth:`ImageCache.drop_inputs`). A test checks that a cached request's
inputs are identical to a fresh one's (less those pixels) and give the same logits, so a change in
that hook shows up as a failure, not a wrong answer.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Iterator
from typing import Any


class ImageCache:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._current = threading.local()  # the digest of the image being preprocessed, per thread
        self.hits = collections.Counter()  # by kind: "preprocessing", "features"
        self.misses = collections.Counter()

    def get(self, digest: str, kind: str) -> Any | None:
        if not self.capacity or not digest:
            return None
        with self._lock:
            entry = self._entries.get(digest)
            value = entry.get(kind) if entry is not None else None
            if value is None:
                self.misses[kind] += 1
                return None
            self._entries.move_to_end(digest)
            self.hits[kind] += 1
            return value

    def put(self, digest: str, kind: str, value: Any) -> None:
        if not self.capacity or not digest:
            return
        with self._lock:
            self._entries.setdefault(digest, {})[kind] = value
            self._entries.move_to_end(digest)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def drop_inputs(self, digest: str, names: tuple[str, ...]) -> None:
        """Drop processor outputs ``names`` (the pixel tensors) from the image's cached preprocessing.

        Called once the vision features they were for are cached beside them: a hit then needs only
        the text part of the preprocessing, and the pixels are most of an entry's memory (SmolVLM-256M:
        up to 17 tiles of 3x512x512 float32, about 53 MB, against about 2.5 MB of features).
        """
        with self._lock:
            entry = self._entries.get(digest)
            if entry is not None and "preprocessing" in entry:
                processed, replacements = entry["preprocessing"]
                entry["preprocessing"] = ({k: v for k, v in processed.items() if k not in names}, replacements)

    def stats(self) -> tuple[dict[str, int], dict[str, int]]:
        """Hits and misses so far, by kind (copies, for the metrics)."""
        with self._lock:
            return dict(self.hits), dict(self.misses)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @contextlib.contextmanager
    def preprocessing(self, processor, digest: str) -> Iterator[None]:
        """Within this block, ``processor`` takes the image part of its work from the cache."""
        if not self.capacity or not digest:
            yield
            return
        if not getattr(processor, "_vlm_image_cache", None):
            self._hook(processor)
        self._current.digest = digest
        try:
            yield
        finally:
            self._current.digest = None

    def _hook(self, processor) -> None:
        original = processor._process_images

        def process_images(images, **kwargs):
            digest = getattr(self._current, "digest", None)
            cached = self.get(digest, "preprocessing") if digest else None
            if cached is not None:
                return cached
            result = original(images, **kwargs)
            if digest:
                self.put(digest, "preprocessing", result)
            return result

        processor._process_images = process_images
        processor._vlm_image_cache = self
