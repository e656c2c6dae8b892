"""The backend base class: what a model family implements.

Lifecycle, driven by the engine (one instance per served model):

1. ``__init__(spec, runtime)`` stores the model's source and the runtime choices; it loads nothing.
2. ``load()`` runs once, off the event loop, before any request: load weights and processors.
3. ``generate(request, out)`` runs in the model's one worker thread, one request at a time. It feeds
   raw text to ``out.add_text`` as soon as the model writes it, checks ``out.should_stop()`` between
   decode steps (cancelled RPC, deadline, stop string), and returns an :class:`Outcome`.
   Exceptions it raises end that request with INTERNAL; the worker goes on with the next.
   A family that sets ``batches = True`` (the transformers families) is instead driven by the
   engine's batching worker, which decodes many requests together through ``prefill`` and
   :class:`~vlm_service.batching.DecodeBatch`; its ``generate`` is that same path with one row.

Capabilities are declared as class attributes, not discovered.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

from ..image_cache import ImageCache
from ..types import CaptionLength, FinishReason, GenerationRequest


@dataclass(frozen=True)
class ModelSpec:
    """Where one served model comes from."""

    name: str
    source: str  # local directory or Hugging Face repo id
    revision: str | None = None
    family: str = ""  # filled in by registry.resolve
    builtin: str | None = None  # built-in name whose checkpoint is built locally

    @property
    def display_source(self) -> str:
        return f"{self.source}@{self.revision}" if self.revision else self.source


@dataclass(frozen=True)
class Runtime:
    """Runtime choices shared by every backend."""

    device: str = "auto"  # auto | cpu | cuda | mps
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    image_cache_size: int = 0  # images whose preprocessing and vision features are kept (0: off)
    image_cache_bytes: int = 0  # bytes of tensors the image cache may keep (0: auto, from the device's memory)

    def image_cache_budget(self) -> int:
        """The image cache's bound in bytes: the setting, or for 0 1/32 of the device's memory."""
        if self.image_cache_bytes:
            return self.image_cache_bytes
        device, _ = self.resolve()
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
        else:
            import os

            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return total // 32

    def resolve(self) -> tuple[torch.device, torch.dtype]:
        """The torch device and dtype: auto is cuda with bfloat16 when available, else cpu with float32."""
        device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device
        )
        if self.dtype == "auto":
            return device, torch.bfloat16 if device.type == "cuda" else torch.float32
        return device, getattr(torch, self.dtype)


@dataclass(frozen=True)
class Outcome:
    """How a generation ended, as the backend saw it (stop strings and cancels are the engine's)."""

    prompt_tokens: int
    completion_tokens: int
    reason: FinishReason  # STOP (end-of-sequence) or LENGTH (max_new_tokens)


class TextSink(Protocol):
    """Where a backend sends what the model writes, and asks whether to go on."""

    def add_text(self, piece: str) -> None: ...

    def should_stop(self) -> bool: ...


class Backend(abc.ABC):
    """One model family. Subclasses set the class attributes and implement ``load`` and ``generate``."""

    #: Registry name of the family ("smolvlm", ...).
    family: ClassVar[str]
    #: Caption lengths the family supports.
    caption_lengths: ClassVar[tuple[CaptionLength, ...]] = tuple(CaptionLength)
    #: Response languages the family supports (BCP-47 codes); the first is the default.
    languages: ClassVar[tuple[str, ...]] = ("en",)
    #: GenerationOptions fields the family honours; a request setting any other is INVALID_ARGUMENT.
    supported_options: ClassVar[frozenset[str]] = frozenset(
        {"max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "stop", "seed"}
    )
    #: Whether concurrent requests are decoded together (a batching worker) or one at a time.
    batches: ClassVar[bool] = False
    #: Role words the model may write before its answer; removed once from the start of the text.
    role_prefixes: ClassVar[tuple[str, ...]] = ()
    #: Default token budget per caption length, used when a request leaves max_new_tokens at 0.
    caption_budgets: ClassVar[dict[CaptionLength, int]] = {
        CaptionLength.SHORT: 32,
        CaptionLength.NORMAL: 96,
        CaptionLength.LONG: 256,
    }

    def __init__(self, spec: ModelSpec, runtime: Runtime):
        self.spec = spec
        self.runtime = runtime
        #: What this model already computed for recent images (by content hash); see image_cache.
        self.images = ImageCache(runtime.image_cache_size, runtime.image_cache_budget())

    @abc.abstractmethod
    def load(self) -> None:
        """Load weights and processors. Called once, off the event loop."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest, out: TextSink) -> Outcome:
        """Generate the answer to ``request``, streaming raw text into ``out``."""

    #: The loaded torch model (set by ``load``).
    model: Any

    @property
    def context_length(self) -> int:
        """The model's context length in tokens."""
        return 0

    @property
    def device(self) -> str:
        return str(self.model.device)

    @property
    def dtype(self) -> str:
        return str(self.model.dtype).removeprefix("torch.")
