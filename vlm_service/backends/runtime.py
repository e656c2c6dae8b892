"""Where a model comes from (:class:`ModelSpec`) and the runtime choices every backend shares
(:class:`Runtime`: device, dtype, image cache, chunked prefill, OpenVINO)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch


@dataclass(frozen=True)
class ModelSpec:
    """Where one served model comes from."""

    name: str
    source: str  # local directory or Hugging Face repo id
    revision: str | None = None
    family: str = ""  # filled in by catalogue.resolve
    builtin: str | None = None  # built-in name whose checkpoint is built locally

    @property
    def display_source(self) -> str:
        return f"{self.source}@{self.revision}" if self.revision else self.source


#: From this many parameters a model is compute-bound on a CPU: it gets every core (auto torch threads),
#: prefills in chunks (auto chunked prefill) and runs its encoder and decode steps with OpenVINO (auto).
LARGE_MODEL_PARAMETERS = 50_000_000


def parameters(model) -> int:
    """How many parameters ``model`` has (0 for None or an object that is not a torch module)."""
    return sum(p.numel() for p in model.parameters()) if hasattr(model, "parameters") else 0


@dataclass(frozen=True)
class PrefillPolicy:
    """How one model's new requests are prefilled while its other requests decode: the one owner of
    that policy. A family declares how its prefill can be cut (its ``chunking``: chunk sizes measured
    for its model); the settings say what the server wants (``--chunked-prefill``,
    ``--prefill-budget-ms``); :meth:`Runtime.prefill_policy` makes the policy of both, and the backend
    (chunk sizes), the batch (the oldest joining request's next chunk first) and the scheduler (the
    time budget) follow it. Chunks depend on the request and the model only, never on timing, so a
    request's answer is the same however its chunks interleave with other work."""

    chunked: bool = False  # the prefill is cut into chunks (else one piece)
    text_chunk_tokens: int | None = None  # prompt tokens per chunk of the text part (None: one pass)
    vision_chunk_layers: int | None = None  # vision encoder layers per chunk of a view
    #: Seconds of prefill chunks between two decode steps while other requests decode (at least one
    #: chunk runs): the streams already running wait for one slice of a newcomer's prefill, never all.
    budget: float = 0.25


@dataclass(frozen=True)
class Runtime:
    """Runtime choices shared by every backend."""

    device: str = "auto"  # auto | cpu | cuda | mps
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    image_cache_size: int = 0  # images whose preprocessing and vision features are kept (0: off)
    image_cache_bytes: int = 0  # bytes of tensors the image cache may keep (0: auto, from the device's memory)
    chunked_prefill: str = "auto"  # auto | on | off: prefill in chunks between decode steps
    prefill_budget: float = 0.25  # seconds of prefill chunks between decode steps
    openvino: str = "auto"  # auto | on | off: a family's vision encoder layers and decode steps on OpenVINO

    def uses_openvino(self, model_parameters: int, device: torch.device) -> bool:
        """Whether a model of ``model_parameters`` on ``device`` runs its vision encoder layers and decode
        steps with OpenVINO (a family that can): on, or auto on a CPU for a large model."""
        if self.openvino == "on":
            if device.type != "cpu":
                raise ValueError(f"--openvino on runs on a CPU; this model is on {device.type}")
            return True
        return self.openvino == "auto" and device.type == "cpu" and model_parameters >= LARGE_MODEL_PARAMETERS

    def prefill_policy(self, model_parameters: int, chunking: PrefillPolicy | None) -> PrefillPolicy:
        """The prefill policy of a model of ``model_parameters`` whose family cuts its prefill as
        ``chunking`` (None: it cannot): chunked when the setting is on, or auto and the model is large."""
        chunked = self.chunked_prefill == "on" or (
            self.chunked_prefill == "auto" and model_parameters >= LARGE_MODEL_PARAMETERS
        )
        if chunking is None or not chunked:
            return PrefillPolicy(budget=self.prefill_budget)
        return replace(chunking, chunked=True, budget=self.prefill_budget)

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

    def resolve(self, saved: torch.dtype | None = None) -> tuple[torch.device, torch.dtype]:
        """The torch device and dtype. Device auto is cuda when available, else cpu. Dtype auto is
        bfloat16 on cuda; on a CPU it is bfloat16 when the checkpoint is ``saved`` in bfloat16 and the
        CPU computes bfloat16 natively (:func:`native_bfloat16`), else float32 (bfloat16 matrices
        without those instructions are many times slower than float32)."""
        device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device
        )
        if self.dtype != "auto":
            return device, getattr(torch, self.dtype)
        if device.type == "cuda" or (device.type == "cpu" and saved == torch.bfloat16 and native_bfloat16()):
            return device, torch.bfloat16
        return device, torch.float32


def native_bfloat16() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (AVX512-BF16 or AMX-BF16), which make a
    bfloat16 model several times faster than float32 on it."""
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def saved_dtype(config: Any) -> torch.dtype | None:
    """The dtype a transformers checkpoint says its weights are saved in (``config.json``'s ``dtype``,
    ``torch_dtype`` in older files), or None."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None
