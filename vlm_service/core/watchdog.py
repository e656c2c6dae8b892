"""The watchdog thread: a scheduler that works without a sign of life (a decode step, a prefill
chunk, a stop check) for the stall timeout holds its model for good, as far as anyone can tell; the
engine is told once per model (it fails the model and the server exits for its supervisor)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping

from vlm_service.core.served import ServedModel


class Watchdog:
    def __init__(self, models: Mapping[str, ServedModel], timeout: float, stuck: Callable[[str, float], None]):
        self._models = models
        self._timeout = timeout
        self._stuck = stuck
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vlm-watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        timeout = self._timeout
        while not self._closed.wait(min(1.0, timeout / 4)):
            now = time.monotonic()
            for name, served in self._models.items():
                scheduler = served.scheduler
                if scheduler is not None and not scheduler.stuck and scheduler.silent_for(now) > timeout:
                    self._stuck(name, timeout)

    def close(self) -> None:
        self._closed.set()
