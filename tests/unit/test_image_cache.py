"""The image cache's bookkeeping: least-recently-used eviction, per-kind entries, off at capacity 0."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy

from vlm_service.images.cache import ImageCache


def test_least_recently_used_images_are_evicted_beyond_capacity():
    cache = ImageCache(2)
    cache.put("a", "features", 1)
    cache.put("b", "features", 2)
    assert cache.get("a", "features") == 1  # a is now the most recent
    cache.put("c", "features", 3)
    assert len(cache) == 2
    assert cache.get("b", "features") is None
    assert (cache.get("a", "features"), cache.get("c", "features")) == (1, 3)
    assert cache.hits["features"] == 3 and cache.misses["features"] == 1


def test_kinds_of_one_image_share_its_entry():
    cache = ImageCache(1)
    cache.put("a", "preprocessing", "p")
    cache.put("a", "features", "f")
    assert len(cache) == 1
    assert (cache.get("a", "preprocessing"), cache.get("a", "features")) == ("p", "f")
    assert cache.get("a", "encoded") is None


def test_capacity_zero_or_no_digest_keeps_nothing():
    off = ImageCache(0)
    off.put("a", "features", 1)
    assert off.get("a", "features") is None and len(off) == 0
    on = ImageCache(4)
    on.put("", "features", 1)
    assert on.get("", "features") is None and len(on) == 0


def test_pixels_are_dropped_from_the_preprocessing_but_the_rest_is_kept():
    cache = ImageCache(2)
    cache.put("a", "preprocessing", ({"pixel_values": "big", "image_grid_thw": "small"}, ["<image>"]))
    cache.drop_inputs("a", ("pixel_values",))
    assert cache.get("a", "preprocessing") == ({"image_grid_thw": "small"}, ["<image>"])
    cache.drop_inputs("b", ("pixel_values",))  # an image not cached: nothing happens
    assert len(cache) == 1


def test_the_cache_is_bounded_in_bytes_of_the_tensors_it_keeps():
    import torch

    from vlm_service.images.cache import tensor_bytes

    kib = torch.zeros(256)  # 1 KiB of float32
    assert tensor_bytes({"a": kib, "b": [kib, (kib, "text")], "c": None}) == 3 * 1024
    cache = ImageCache(capacity=100, max_bytes=3 * 1024)
    cache.put("one", "features", {"x": torch.zeros(256)})
    cache.put("two", "features", {"x": torch.zeros(256)})
    cache.put("two", "preprocessing", ({"pixel_values": torch.zeros(256)}, ["<image>"]))
    assert cache.bytes == 3 * 1024 and len(cache) == 2
    cache.put("three", "features", {"x": torch.zeros(256)})  # over budget: the least recent goes
    assert cache.get("one", "features") is None and cache.get("two", "features") is not None
    assert cache.bytes == 3 * 1024
    cache.drop_inputs("two", ("pixel_values",))  # dropping pixels gives their bytes back
    assert cache.bytes == 2 * 1024
    cache.put("huge", "features", torch.zeros(4 * 256))  # larger than the whole budget: not kept
    assert cache.get("huge", "features") is None and cache.get("three", "features") is not None
    assert cache.bytes == 2 * 1024


def test_requests_prepared_in_several_threads_at_once_hook_the_processor_once_and_never_deadlock():
    """Requests are prepared in several threads: on an empty cache they race to hook the processor. It is
    hooked once (every image processed once, each miss counted once), and nothing waits on itself."""
    cache = ImageCache(8)
    barrier = threading.Barrier(4)

    class Processor:
        calls = 0

        def _process_images(self, images, **kwargs):
            Processor.calls += 1
            return {"pixel_values": images}, ["<image>"]

    processor = Processor()

    def prepare(i: int):
        barrier.wait(10)
        with cache.preprocessing(processor, f"digest-{i}"):
            return processor._process_images([i])

    with ThreadPoolExecutor(4) as pool:
        results = [future.result(timeout=30) for future in [pool.submit(prepare, i) for i in range(4)]]
    assert [result[0]["pixel_values"] for result in results] == [[0], [1], [2], [3]]
    assert Processor.calls == 4 and cache.misses["preprocessing"] == 4
    with cache.preprocessing(processor, "digest-2"):
        assert processor._process_images([9]) == results[2]  # from the cache
    assert Processor.calls == 4 and cache.hits["preprocessing"] == 1


def test_a_processor_is_hooked_once_while_the_cache_stays_empty():
    """An entry larger than the byte budget is not kept, so the cache stays empty: later requests still
    find the processor hooked (an empty cache is falsy; asking its length takes the cache's lock, which
    the hooking code holds: a check by truthiness would wait on itself)."""
    cache = ImageCache(8, max_bytes=16)

    class Processor:
        calls = 0

        def _process_images(self, images, **kwargs):
            Processor.calls += 1
            return {"pixel_values": numpy.zeros(1024, dtype=numpy.uint8)}, ["<image>"]

    processor = Processor()

    def prepare(i: int):
        with cache.preprocessing(processor, f"digest-{i}"):
            return processor._process_images([i])

    with ThreadPoolExecutor(1) as pool:
        for i in range(3):
            pool.submit(prepare, i).result(timeout=10)
    assert len(cache) == 0 and Processor.calls == 3 and cache.misses["preprocessing"] == 3
