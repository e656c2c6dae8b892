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

The cache is bounded twice: in images (``capacity``) and in bytes (``max_bytes``), the bytes of every
tensor an entry keeps wherever it lives (vision features on a GPU count against its memory). An entry
larger than the whole budget is not kept.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading
from collections.abc import Iterator, Mapping
from typing import Any


def tensor_bytes(value: Any, _depth: int = 0) -> int:
    """Bytes of the tensors (torch or numpy) inside ``value``: mappings, sequences and dataclasses are
    searched, other objects count 0."""
    if _depth > 8 or value is None or isinstance(value, (str, bytes, int, float, bool)):
        return 0
    nbytes = getattr(value, "nbytes", None)  # torch.Tensor (2.1+) and numpy arrays
    if isinstance(nbytes, int) and hasattr(value, "shape"):
        return nbytes
    if isinstance(value, Mapping):
        return sum(tensor_bytes(v, _depth + 1) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v, _depth + 1) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(tensor_bytes(getattr(value, f.name), _depth + 1) for f in dataclasses.fields(value))
    return 0


class ImageCache:
    def __init__(self, capacity: int, max_bytes: int = 1 << 62):
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._entries: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        self._sizes: dict[str, int] = {}  # bytes of each entry's tensors
        self.bytes = 0  # bytes of every entry's tensors
        self._lock = threading.Lock()
        self._current = threading.local()  # the digest of the image being preprocessed, per thread
        self._flights: dict[tuple[str, str], threading.Event] = {}  # computations under way (get_or_compute)
        self.hits = collections.Counter()  # by kind: "preprocessing", "features"
        self.misses = collections.Counter()

    def get(self, digest: str, kind: str) -> Any | None:
        if not self.capacity or not digest:
            return None
        with self._lock:
            value = self._cached(digest, kind)
            if value is None:
                self.misses[kind] += 1
            return value

    def _cached(self, digest: str, kind: str) -> Any | None:
        """The entry's ``kind`` (a hit, counted, and the entry made most recent), or None (the lock held)."""
        entry = self._entries.get(digest)
        value = entry.get(kind) if entry is not None else None
        if value is not None:
            self._entries.move_to_end(digest)
            self.hits[kind] += 1
        return value

    def shared(self, kind: str) -> None:
        """Count a hit for a request that takes ``kind`` from another request's computation of the same
        picture in the same step (a batched prefill encodes a picture once for all who sent it)."""
        with self._lock:
            self.hits[kind] += 1

    def get_or_compute(self, digest: str, kind: str, compute) -> Any:
        """The cached ``kind`` of the image, or ``compute()`` cached. Callers on one picture in several
        threads at once compute it once: the others wait for that one and take its result (a
        hit each), or compute it themselves if it failed or was not kept."""
        if not self.capacity or not digest:
            return compute()
        while True:
            with self._lock:
                value = self._cached(digest, kind)
                if value is not None:
                    return value
                flight = self._flights.get((digest, kind))
                owner = flight is None
                if owner:
                    flight = self._flights[(digest, kind)] = threading.Event()
                    self.misses[kind] += 1
            if not owner:
                flight.wait()
                continue
            try:
                value = compute()
                self.put(digest, kind, value)
                return value
            finally:
                with self._lock:
                    del self._flights[(digest, kind)]
                flight.set()

    def put(self, digest: str, kind: str, value: Any) -> None:
        if not self.capacity or not digest:
            return
        with self._lock:
            entry = self._entries.setdefault(digest, {})
            entry[kind] = value
            self._entries.move_to_end(digest)
            self._resize(digest, sum(tensor_bytes(v) for v in entry.values()))
            if self._sizes[digest] > self.max_bytes:  # alone over the budget: not kept, nothing else goes
                del self._entries[digest]
                self.bytes -= self._sizes.pop(digest)
            self._evict()

    def _resize(self, digest: str, size: int) -> None:
        self.bytes += size - self._sizes.get(digest, 0)
        self._sizes[digest] = size

    def _evict(self) -> None:
        """Drop least recently used entries beyond either bound."""
        while self._entries and (len(self._entries) > self.capacity or self.bytes > self.max_bytes):
            digest, _ = self._entries.popitem(last=False)
            self.bytes -= self._sizes.pop(digest, 0)

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
                self._resize(digest, sum(tensor_bytes(v) for v in entry.values()))

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
        if getattr(processor, "_vlm_image_cache", None) is None:  # (not truthiness: that is len(), under the lock)
            with self._lock:  # callers in several threads at once: hook it once
                if getattr(processor, "_vlm_image_cache", None) is None:
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
            return self.get_or_compute(digest, "preprocessing", lambda: original(images, **kwargs))

        processor._process_images = process_images
        processor._vlm_image_cache = self
