"""One generation worker per model: a bounded queue, a thread, and the bridge back to asyncio.

The event loop never blocks here: ``submit`` only appends to a deque under a short lock (or raises
:class:`QueueFull` at once), and results come back in a per-job deque; the worker wakes the RPC
handler with ``loop.call_soon_threadsafe`` once per burst of events, not once per token. The model runs only in the worker thread, one request
at a time, because some families keep per-instance state that concurrent ``generate`` calls corrupt;
families that can batch get a :class:`BatchingWorker`, whose one thread decodes many requests together.

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
from typing import TYPE_CHECKING

from .backends.base import Backend, Outcome
from .batching import DecodeBatch
from .errors import GenerationFailed, GenerationStalled, OutOfMemory, QueueFull, ServiceError, ShuttingDown
from .metrics import ModelMetrics
from .streaming import TextAssembler
from .types import Finished, FinishReason, GenerationRequest, TextDelta, Usage

if TYPE_CHECKING:
    from .tracing import GenerationTrace

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
        metrics: ModelMetrics | None = None,
        trace: GenerationTrace | None = None,
    ):
        self.request = request
        self.trace = trace  # None unless tracing is on
        self._loop = loop
        # Events cross from the worker thread in a deque; the loop is woken at most once per batch of
        # them (``_wake_pending``), so a busy batch does not flood the loop with one wake-up per token.
        self._events: collections.deque = collections.deque()
        self._arrived = asyncio.Event()
        self._wake_pending = False
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
        self._metrics = metrics
        self._steps = 0  # decode steps so far (worker thread)

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
        events = self._events
        while True:
            if not events:
                self._arrived.clear()
                if not events:  # re-checked: an event sent before the clear has its wake-up pending
                    try:
                        await asyncio.wait_for(self._arrived.wait(), poll)
                    except TimeoutError:
                        self._check_stalled()
                    continue
            event = events.popleft()
            self._taken += 1
            self.last_taken = time.monotonic()
            if isinstance(event, TextDelta):
                # Text that piled up while the client was slower than the model leaves as one message.
                pieces = [event.text]
                while events and isinstance(events[0], TextDelta):
                    pieces.append(events.popleft().text)
                    self._taken += 1
                yield TextDelta("".join(pieces)) if len(pieces) > 1 else event
                continue
            if isinstance(event, BaseException):
                raise event
            yield event
            return  # Finished is the last event

    def _check_stalled(self) -> None:
        if self.started_at is not None and time.monotonic() - self.last_progress > self._stall_timeout:
            self.cancel()
            logger.error("request %s stalled; stopped it", self.request.request_id)
            raise GenerationStalled(
                f"the generation stalled: no progress for {self._stall_timeout:g} s "
                f"(request id {self.request.request_id})"
            )

    def _wake(self) -> None:
        self._wake_pending = False
        self._arrived.set()

    # --- the worker's side (worker thread): the TextSink a backend writes to ----------------

    def add_text(self, piece: str) -> None:
        delta = self._assembler.push(piece)
        if delta:
            self._send(TextDelta(delta))

    def should_stop(self) -> bool:
        now = time.monotonic()  # called once per decode step
        if self._metrics is not None:
            if self._steps:
                self._metrics.inter_token_latency.observe(now - self.last_progress)
            if self._cancelled.is_set():
                self._metrics.tokens_after_end.inc()
        self._steps += 1
        self.last_progress = now
        backlog = self._sent - self._taken
        if backlog > _BACKLOG and now - self.last_taken > self.abandon_after and not self._cancelled.is_set():
            request_id = self.request.request_id
            logger.warning(
                "request %s: the client stopped reading; stopping its generation",
                request_id,
                extra={"request_id": request_id},
            )
            self._cancelled.set()
        return self._cancelled.is_set() or self._assembler.stopped

    def _send(self, event) -> None:
        if isinstance(event, TextDelta) and self.first_text_at is None:
            self.first_text_at = time.monotonic()
            if self._metrics is not None:
                self._metrics.time_to_first_token.observe(self.first_text_at - self.request.arrival)
        self._sent += 1
        self._events.append(event)
        if not self._wake_pending:
            self._wake_pending = True
            try:
                self._loop.call_soon_threadsafe(self._wake)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                self._cancelled.set()

    def final_reason(self, outcome: Outcome) -> FinishReason:
        """Why the generation ended, stop strings (the engine's) included."""
        return FinishReason.STOP_SEQUENCE if self._assembler.stopped else outcome.reason

    def _finish(self, outcome: Outcome, reason: FinishReason) -> None:
        tail = self._assembler.finish()
        if tail:
            self._send(TextDelta(tail))
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

    def __init__(
        self,
        name: str,
        backend: Backend,
        max_queue: int,
        on_fatal: Callable[[str], None] | None = None,
        metrics: ModelMetrics | None = None,
        slots: int = 1,
    ):
        self.name = name
        self.metrics = metrics
        self.backend = backend
        self.max_queue = max_queue
        self._on_fatal = on_fatal
        self.seconds_per_request: float | None = None  # moving average of generation times
        self._pending: collections.deque[Job] = collections.deque()
        self._lock = threading.Condition()
        self._closed = False
        self._active: list[Job] = []  # started and not finished
        self.completed = 0  # finished generations (for tests and metrics)
        self.slots = slots  # requests that run at once
        self._thread = threading.Thread(target=self._run, name=f"vlm-worker-{name}", daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        with self._lock:
            return len(self._pending)

    @property
    def running(self) -> int:
        with self._lock:
            return len(self._active)

    def estimated_wait(self) -> float | None:
        """Seconds until a request submitted now would start, from recent generation times."""
        if self.seconds_per_request is None:
            return None
        with self._lock:
            ahead = len(self._pending) + len(self._active)
        return ahead // self.slots * self.seconds_per_request  # a slot frees about every request's time

    @property
    def busy(self) -> bool:
        with self._lock:
            return bool(self._active) or bool(self._pending)

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

    def _take(self, room: int) -> list[Job] | None:
        """Up to ``room`` jobs that should start (waits for one if nothing runs); None: closed and done."""
        with self._lock:
            while not self._pending and not self._active and not self._closed:
                self._lock.wait()
            if not self._pending and not self._active:
                return None
            taken = []
            while self._pending and len(taken) < room:
                job = self._pending.popleft()
                expired = job.request.deadline is not None and time.monotonic() >= job.request.deadline
                if not job.cancelled and not expired:
                    taken.append(job)
                    self._active.append(job)
            return taken

    def _done(self, job: Job) -> None:
        with self._lock:
            self._active.remove(job)

    def _run(self) -> None:
        while (jobs := self._take(1)) is not None:
            for job in jobs:
                try:
                    self._execute(job)
                finally:
                    self._done(job)

    def _start(self, job: Job) -> None:
        job.started_at = job.last_progress = time.monotonic()
        if self.metrics is not None:
            self.metrics.queue_time.observe(job.started_at - job.request.arrival)
        if job.trace is not None:
            job.trace.started(job.started_at)

    def _execute(self, job: Job) -> None:
        self._start(job)
        try:
            outcome = self.backend.generate(job.request, job if job.trace is None else _TracedSink(job))
        except Exception as exc:
            self._failed(job, exc)
            return
        self._finished(job, outcome)

    def _finished(self, job: Job, outcome: Outcome) -> None:
        elapsed = time.monotonic() - job.started_at
        previous = self.seconds_per_request
        self.seconds_per_request = elapsed if previous is None else 0.8 * previous + 0.2 * elapsed
        self.completed += 1
        reason = None if job.cancelled else job.final_reason(outcome)
        if self.metrics is not None:
            self.metrics.tokens.inc(outcome.completion_tokens)
            self.metrics.prompt_tokens.inc(outcome.prompt_tokens)
            if reason is not None:
                self.metrics.finish_reasons[reason].inc()
        if job.trace is not None:
            job.trace.ended(time.monotonic(), reason, outcome.prompt_tokens, outcome.completion_tokens)
        if reason is not None:
            job._finish(outcome, reason)

    def _failed(self, job: Job, exc: Exception) -> None:
        """End ``job`` after its generation raised ``exc`` (called in the worker thread)."""
        request = job.request
        if job.trace is not None:
            job.trace.ended(time.monotonic(), error=exc)
        ids = {"request_id": request.request_id}
        if is_out_of_memory(exc):
            logger.error(
                "request %s on model %s ran out of memory; freeing it", request.request_id, self.name, extra=ids
            )
            free_memory()
            job._fail(OutOfMemory(request.request_id))
            return
        logger.exception("request %s on model %s failed", request.request_id, self.name, exc_info=exc, extra=ids)
        job._fail(GenerationFailed(request.request_id))
        if is_fatal_device_error(exc) and self._on_fatal is not None:
            self._on_fatal(self.name)


class BatchingWorker(ModelWorker):
    """Decodes up to ``slots`` requests together, admitting new ones between decode steps.

    The thread loops: take waiting jobs while the batch has room (each is prefilled alone and joins
    the batch), then one decode step for every row. A row leaves the batch the step it finishes or its
    RPC ends, so it stops costing compute at once; the other rows go on.
    """

    def _run(self) -> None:
        batch = DecodeBatch(self.backend)
        while (new := self._take(self.slots - len(batch))) is not None:
            for job in new:
                self._start(job)
                try:
                    row = batch.admit(job.request, job)
                except Exception as exc:
                    self._failed(job, exc)
                    self._done(job)
                    continue
                if job.trace is not None:  # the prompt is processed and the first token out
                    job.trace.first_token(time.monotonic())
                if row.done:
                    self._finished(job, row.outcome)
                    self._done(job)
            if not len(batch):
                continue
            if self.metrics is not None:
                self.metrics.batch_size.observe(len(batch))
            try:
                finished = batch.step()
            except Exception as exc:
                # A failed step leaves no row in a known state: each gets the error, the batch starts over.
                for row in batch.abort():  # each row's sink is its Job
                    self._failed(row.sink, exc)
                    self._done(row.sink)
                continue
            for row in finished:
                self._finished(row.sink, row.outcome)
                self._done(row.sink)


class _TracedSink:
    """A traced job's sink for a one-at-a-time backend: the first text the model writes ends the
    prefill phase. Only traced jobs pay for this indirection."""

    __slots__ = ("_job", "_first", "should_stop")

    def __init__(self, job: Job):
        self._job = job
        self._first = True
        self.should_stop = job.should_stop

    def add_text(self, piece: str) -> None:
        if self._first:
            self._first = False
            self._job.trace.first_token(time.monotonic())
        self._job.add_text(piece)
