"""One generation worker per model: a bounded queue, a thread, and the bridge back to asyncio.

The event loop never blocks here: ``submit`` only appends to a deque under a short lock (or raises
:class:`QueueFull` at once), and results come back through ``loop.call_soon_threadsafe`` into an
``asyncio.Queue`` that the RPC handler awaits. The model runs only in the worker thread, one request
at a time, because some families keep per-instance state that concurrent ``generate`` calls corrupt.

A :class:`Job` is owned by its RPC: when the RPC ends (finished, cancelled, deadline, disconnect)
the handler calls :meth:`Job.cancel`; a queued job is dropped before it starts and a running one
stops at its next decode step.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable

from .backends.base import Backend, Outcome
from .errors import GenerationFailed, GenerationStalled, OutOfMemory, QueueFull, ServiceError, ShuttingDown
from .streaming import TextAssembler
from .types import Finished, FinishReason, GenerationRequest, TextDelta, Usage

logger = logging.getLogger(__name__)

#: Undelivered events beyond which a client that reads nothing counts as gone.
_BACKLOG = 32

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


class Job:
    """One request's generation: an async stream of events and a switch to stop it."""

    def __init__(
        self,
        request: GenerationRequest,
        loop: asyncio.AbstractEventLoop,
        role_prefixes=(),
        stall_timeout: float = 60.0,
        abandon_after: float = 40.0,
    ):
        self.request = request
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()
        self._cancelled = threading.Event()
        self.started_at: float | None = None
        self.first_text_at: float | None = None
        self.last_progress: float = 0.0  # monotonic time of the last decode step (worker thread)
        self._stall_timeout = stall_timeout
        # Back-pressure: the RPC takes events only as fast as the client reads them. A client that
        # reads nothing for ``abandon_after`` seconds while output piles up has gone: stop generating.
        self.abandon_after = abandon_after
        self.last_taken = time.monotonic()
        self._sent = 0  # events sent (written by the worker thread only)
        self._taken = 0  # events taken (written by the event loop only)
        self._assembler = TextAssembler(request.params.stop, role_prefixes)
        self._worker: ModelWorker | None = None

    # --- the RPC's side (event loop) ---------------------------------------------------------

    def cancel(self) -> None:
        """Stop this job: a queued job never starts, a running one stops at its next decode step."""
        if not self._cancelled.is_set():
            self._cancelled.set()
            if self._worker is not None:
                self._worker.discard(self)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    async def events(self) -> AsyncIterator[TextDelta | Finished]:
        """Text deltas as they are written, then one :class:`Finished`; raises a ServiceError on failure.

        A running generation that makes no decode step for the stall timeout is stopped and ends with
        :class:`GenerationStalled`.
        """
        poll = min(1.0, self._stall_timeout / 2)
        while True:
            try:
                # The common case, an event already waiting, costs no timer.
                event = (
                    self._events.get_nowait()
                    if not self._events.empty()
                    else await asyncio.wait_for(self._events.get(), poll)
                )
            except TimeoutError:
                if self.started_at is not None and time.monotonic() - self.last_progress > self._stall_timeout:
                    self.cancel()
                    logger.error("request %s stalled; stopped it", self.request.request_id)
                    raise GenerationStalled(
                        f"the generation stalled: no progress for {self._stall_timeout:g} s "
                        f"(request id {self.request.request_id})"
                    ) from None
                continue
            self._taken += 1
            self.last_taken = time.monotonic()
            if isinstance(event, BaseException):
                raise event
            yield event
            if isinstance(event, Finished):
                return

    # --- the worker's side (worker thread): the TextSink a backend writes to ----------------

    def add_text(self, piece: str) -> None:
        delta = self._assembler.push(piece)
        if delta:
            self._send(TextDelta(delta))

    def should_stop(self) -> bool:
        now = self.last_progress = time.monotonic()  # called once per decode step
        backlog = self._sent - self._taken
        if backlog > _BACKLOG and now - self.last_taken > self.abandon_after and not self._cancelled.is_set():
            logger.warning("request %s: the client stopped reading; stopping its generation", self.request.request_id)
            self._cancelled.set()
        return self._cancelled.is_set() or self._assembler.stopped

    def _send(self, event) -> None:
        if isinstance(event, TextDelta) and self.first_text_at is None:
            self.first_text_at = time.monotonic()
        try:
            self._sent += 1
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self._cancelled.set()

    def _finish(self, outcome: Outcome) -> None:
        tail = self._assembler.finish()
        if tail:
            self._send(TextDelta(tail))
        reason = FinishReason.STOP_SEQUENCE if self._assembler.stopped else outcome.reason
        now = time.monotonic()
        arrival = self.request.arrival
        first = self.first_text_at or now
        usage = Usage(
            prompt_tokens=outcome.prompt_tokens,
            completion_tokens=outcome.completion_tokens,
            queue_time_ms=((self.started_at or now) - arrival) * 1000,
            time_to_first_token_ms=(first - arrival) * 1000,
            total_time_ms=(now - arrival) * 1000,
        )
        self._send(Finished(reason, usage))

    def _fail(self, error: ServiceError) -> None:
        self._send(error)


class ModelWorker:
    """Runs one backend's requests one at a time in a dedicated thread."""

    def __init__(self, name: str, backend: Backend, max_queue: int, on_fatal: Callable[[str], None] | None = None):
        self.name = name
        self.backend = backend
        self.max_queue = max_queue
        self._on_fatal = on_fatal
        self.seconds_per_request: float | None = None  # moving average of generation times
        self._pending: collections.deque[Job] = collections.deque()
        self._lock = threading.Condition()
        self._closed = False
        self._running: Job | None = None
        self.completed = 0  # finished generations (for tests and metrics)
        self._thread = threading.Thread(target=self._run, name=f"vlm-worker-{name}", daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        with self._lock:
            return len(self._pending)

    def estimated_wait(self) -> float | None:
        """Seconds until a request submitted now would start, from recent generation times."""
        if self.seconds_per_request is None:
            return None
        with self._lock:
            ahead = len(self._pending) + (self._running is not None)
        return ahead * self.seconds_per_request

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._running is not None or bool(self._pending)

    def submit(self, job: Job) -> None:
        """Queue a job, or raise QueueFull / ShuttingDown at once. Never blocks on the model."""
        with self._lock:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(
                    f"model {self.name!r} has {len(self._pending)} requests waiting (the limit); retry later"
                )
            job._worker = self
            self._pending.append(job)
            self._lock.notify()

    def discard(self, job: Job) -> None:
        """Remove a job that has not started (its RPC ended)."""
        with self._lock, contextlib.suppress(ValueError):
            self._pending.remove(job)

    def close(self) -> None:
        """Refuse new jobs; the thread exits once the queue is empty."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._closed:
                    self._lock.wait()
                if not self._pending:
                    return
                job = self._pending.popleft()
                self._running = job
            try:
                expired = job.request.deadline is not None and time.monotonic() >= job.request.deadline
                if not job.cancelled and not expired:
                    self._execute(job)
            finally:
                with self._lock:
                    self._running = None

    def _execute(self, job: Job) -> None:
        job.started_at = time.monotonic()
        request = job.request
        job.last_progress = job.started_at
        try:
            outcome = self.backend.generate(request, job)
        except Exception as exc:
            if is_out_of_memory(exc):
                logger.error("request %s on model %s ran out of memory; freeing it", request.request_id, self.name)
                free_memory()
                job._fail(OutOfMemory(request.request_id))
                return
            logger.exception("request %s on model %s failed", request.request_id, self.name)
            job._fail(GenerationFailed(request.request_id))
            if is_fatal_device_error(exc) and self._on_fatal is not None:
                self._on_fatal(self.name)
            return
        elapsed = time.monotonic() - job.started_at
        previous = self.seconds_per_request
        self.seconds_per_request = elapsed if previous is None else 0.8 * previous + 0.2 * elapsed
        self.completed += 1
        if not job.cancelled:
            job._finish(outcome)
