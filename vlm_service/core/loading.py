"""Loading a model: the runtime choices from the settings, torch's thread count per model, the
warm-up generation, and freezing what was loaded out of the garbage collector's sight."""

from __future__ import annotations

import gc
import logging
import os

from PIL import Image, ImageDraw

from vlm_service.backends.base import Backend
from vlm_service.backends.runtime import LARGE_MODEL_PARAMETERS, ModelSpec, Runtime
from vlm_service.config import Settings
from vlm_service.types import GenerationRequest, SamplingParams, Task

logger = logging.getLogger(__name__)


def runtime_of(settings: Settings) -> Runtime:
    """The runtime choices every backend of this server shares."""
    return Runtime(
        device=settings.device,
        dtype=settings.dtype,
        image_cache_size=settings.image_cache_size,
        image_cache_bytes=settings.image_cache_bytes,
        chunked_prefill=settings.chunked_prefill,
        prefill_budget=settings.prefill_budget_ms / 1000,
        openvino=settings.openvino,
    )


def warm_up(spec: ModelSpec, backend: Backend) -> None:
    """One short generation through the real path, so SERVING means a request will work."""

    class _Discard:
        def add_text(self, piece: str) -> None:
            pass

        def should_stop(self) -> bool:
            return False

        def waiting(self) -> bool:
            return False

    request = GenerationRequest(
        request_id="warmup",
        model=spec.name,
        task=Task.CAPTION,
        image=warmup_image(),
        params=SamplingParams(max_new_tokens=2),
    )
    backend.generate(request, _Discard())


def auto_torch_threads(cpus: int, model_parameters: int) -> int:
    """The automatic thread count on a CPU: every core for a large model (its matrices dominate a
    step: at SmolVLM-256M size one core fewer costs a third of its speed), one fewer for a small one
    (its steps are short, and torch's spinning threads would starve the gRPC server's)."""
    return cpus if model_parameters >= LARGE_MODEL_PARAMETERS else max(1, cpus - 1)


def set_torch_threads(threads: int, runtime: Runtime, model_parameters: int) -> int | None:
    """Size torch's intra-op thread pool for a model of ``model_parameters``: ``threads``, or for 0 the
    automatic choice (on a CPU; torch's own default on a GPU). Sets it in this thread (the model's
    warm-up runs here) and returns it for the model's scheduler thread, which sets it again when it
    starts: torch keeps the count per thread, so each model's scheduler has its own. None: leave torch's."""
    import torch

    if not threads:
        device, _ = runtime.resolve()
        if device.type != "cpu":
            return None
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = auto_torch_threads(cpus, model_parameters)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    logger.info("torch uses %d intra-op thread(s)", threads)
    return threads


def warmup_image() -> Image.Image:
    image = Image.new("RGB", (64, 48), "white")
    ImageDraw.Draw(image).ellipse((16, 8, 48, 40), fill="red")
    return image


def freeze_loaded_objects() -> None:
    """Take what is loaded (torch, transformers, the model: millions of objects) out of the garbage
    collector's sight, once a model is ready. Unfrozen, a full collection walks them all: with the tiny
    SmolVLM loaded, one took 230 ms under a flood of pictures, and every thread of the server stopped
    for it (health and running streams alike). Collected first, so nothing collectable is frozen."""
    gc.collect()
    gc.freeze()
