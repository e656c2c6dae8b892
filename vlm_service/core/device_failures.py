"""What a failed model call means for the device, and the recovery it needs.

Rules:

- Out of memory (``torch.OutOfMemoryError``, ``MemoryError``, or a message saying so) fails the requests
  of the failed call only: the memory is freed and the model goes on serving.
- A fatal device error (``torch.AcceleratorError``, a CUDA error, a device-side assert, ...) means the
  device, and so every model on it, can no longer be trusted: the model stops serving.
- Anything else fails the requests of the failed call; the model goes on.
- Memory is freed once per failed call, after the traceback's frames are let go: their locals (the
  activations, a KV cache) are what an out-of-memory error needs freed, and a traceback keeps them alive.

The scheduler (scheduler.py) calls :func:`recover` from its one failure path, outside the ``except``
block that caught the error.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass

_FATAL_DEVICE_MESSAGES = (
    "CUDA error",
    "device-side assert",
    "illegal memory access",
    "CUBLAS_STATUS",
    "cuDNN error",
    "unspecified launch failure",
)


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in str(exc).lower()


def is_fatal_device_error(exc: BaseException) -> bool:
    """Errors after which the device (and so every model on it) cannot be trusted any more."""
    import torch

    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return any(marker in str(exc) for marker in _FATAL_DEVICE_MESSAGES)


def free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def drop_traceback(exc: BaseException) -> None:
    """Let go of the frames ``exc`` holds (and those of its causes)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if exc.__traceback__ is not None:
            traceback.clear_frames(exc.__traceback__)
            exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__


@dataclass(frozen=True)
class DeviceFailure:
    """What one failed model call was."""

    out_of_memory: bool
    fatal: bool

    @classmethod
    def of(cls, exc: BaseException) -> DeviceFailure:
        return cls(out_of_memory=is_out_of_memory(exc), fatal=is_fatal_device_error(exc))


def recover(exc: BaseException, failure: DeviceFailure) -> None:
    """After a failed call (its traceback already logged): let go of its frames, then free the memory
    if it ran out. Call it once per failed call, however many requests it served."""
    drop_traceback(exc)
    if failure.out_of_memory:
        free_memory()
