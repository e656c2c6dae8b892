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
from collections.abc import AsyncIterator

from .backends.base import Backend, Outcome
from .errors import GenerationFailed, QueueFull, ServiceError, ShuttingDown
from .streaming import TextAssembler
from .types import Finished, FinishReason, GenerationRequest, TextDelta, Usage

logger = logging.getLogger(__name__)


class Job:
    """One request's generation: an async stream of events and a switch to stop it."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop, role_prefixes=()):
        self.request = request
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()
        self._cancelled = threading.Event()
        self.started_at: float | None = None
        self.first_text_at: float | None = None
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
        """Text deltas as they are written, then one :class:`Finished`; raises a ServiceError on failure."""
        while True:
            event = await self._events.get()
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
        return self._cancelled.is_set() or self._assembler.stopped

    def _send(self, event) -> None:
        if isinstance(event, TextDelta) and self.first_text_at is None:
            self.first_text_at = time.monotonic()
        try:
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

    def __init__(self, name: str, backend: Backend, max_queue: int):
        self.name = name
        self.backend = backend
        self.max_queue = max_queue
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
                if not job.cancelled:
                    self._execute(job)
            finally:
                with self._lock:
                    self._running = None

    def _execute(self, job: Job) -> None:
        job.started_at = time.monotonic()
        request = job.request
        try:
            outcome = self.backend.generate(request, job)
        except Exception:
            logger.exception("request %s on model %s failed", request.request_id, self.name)
            job._fail(GenerationFailed(request.request_id))
            return
        self.completed += 1
        if not job.cancelled:
            job._finish(outcome)
