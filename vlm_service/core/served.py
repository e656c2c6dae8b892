"""The engine's record of one served model: where it comes from, its state, its backend and scheduler."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from vlm_service.backends.base import Backend
from vlm_service.backends.runtime import ModelSpec
from vlm_service.core.scheduler import Scheduler


class ModelState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass
class ServedModel:
    spec: ModelSpec
    state: ModelState = ModelState.LOADING
    backend: Backend | None = None
    scheduler: Scheduler | None = None
    load_seconds: float = 0.0
    error: str = ""  # why it failed, as a client may read it ("stuck", "fatal device error", ...)
    cls: type[Backend] | None = field(default=None, repr=False)
