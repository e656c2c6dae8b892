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
import traceback
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from .backends.base import Backend, Outcome
from .batching import DecodeBatch
from .errors import (
    GenerationFailed,
    OutOfMemory,
    QueueFull,
    ReaderStalled,
    ServiceError,
    ShuttingDown,
)
from .metrics import ModelMetrics
from .streaming import TextAssembler
from .types import Finished, FinishReason, GenerationRequest, TextDelta, Usage

if TYPE_CHECKING:
    from .tracing import GenerationTrace

logger = logging.getLogger(__name__)

#: Undelivered events beyond which a client that reads nothing counts as gone.
_BACKLOG = 32
#: Characters of piled-up text merged into one message at most (UTF-8: at most 4 bytes each), well
#: under the transport's 4 MiB message limit.
_MERGE_LIMIT = 256 * 1024

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
    """Let go of the frames ``exc`` holds (and those of its causes): their locals (activations, a KV
    cache) are what an out-of-memory error needs freed, and a traceback keeps them alive."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if exc.__traceback__ is not None:
            traceback.clear_frames(exc.__traceback__)
            exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__


class Job:
    """One request's generation: an async stream of events and a switch to stop it."""

    def __init__(
        self,
        request: GenerationRequest,
        loop: asyncio.AbstractEventLoop,
        role_prefixes=(),
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
        self._abandoned = False  # the back-pressure guard stopped it (its RPC still listens)
        self._ended = False  # a last event (Finished or an error) was sent
        self._end_lock = threading.Lock()  # the worker and the watchdog may both try to end it
        self._interrupted = False  # interrupt() was called: stop, and end with FinishReason.INTERRUPTED
        self._stopped_by_interrupt = False  # a stop check saw the interrupt (worker thread)

    # --- the RPC's side (event loop) ---------------------------------------------------------

    def cancel(self) -> None:
        """Stop this job: a queued job never starts, a running one stops at its next decode step."""
        if not self._cancelled.is_set():
            self._cancelled.set()
            if self._worker is not None:
                self._worker.discard(self)

    def interrupt(self) -> None:
        """Stop this job early because something newer replaces it (a Watch stream's newer frame).

        Unlike :meth:`cancel`, its RPC still listens: the job ends with :class:`Finished` and
        ``FinishReason.INTERRUPTED`` (the text so far, its usage). A running job stops at its next stop
        check, within one decode step; a queued one ends at once and never starts."""
        if self._interrupted or self._ended or self._cancelled.is_set():
            return
        self._interrupted = True
        worker = self._worker
        if worker is not None and worker.withdraw(self):
            self._finish(Outcome(0, 0, FinishReason.INTERRUPTED), FinishReason.INTERRUPTED)

    @property
    def interrupted(self) -> bool:
        """:meth:`interrupt` was called."""
        return self._interrupted

    @property
    def cancelled(self) -> bool:
        """Its RPC ended (or the engine let it go): nobody waits for its events."""
        return self._cancelled.is_set()

    @property
    def abandoned(self) -> bool:
        """The back-pressure guard stopped it: its client read nothing for ``abandon_after`` seconds."""
        return self._abandoned

    async def events(self) -> AsyncIterator[TextDelta | Finished]:
        """Text deltas as they are written, then one :class:`Finished`; raises a ServiceError on failure.

        Every job that its RPC did not end gets exactly one last event: :class:`Finished`, or the error
        that ended it (a failed or stuck model, see :class:`ModelWorker` and the engine's watchdog, or
        the back-pressure guard), so a reader that resumes after a pause gets the job's true outcome.
        """
        events = self._events
        while True:
            if not events:
                self._arrived.clear()
                if not events:  # re-checked: an event sent before the clear has its wake-up pending
                    await self._arrived.wait()
                    continue
            event = events.popleft()
            self._taken += 1
            self.last_taken = time.monotonic()
            if isinstance(event, TextDelta):
                # Text that piled up while the client was slower than the model leaves as one message.
                pieces, size = [event.text], len(event.text)
                while events and isinstance(events[0], TextDelta) and size < _MERGE_LIMIT:
                    piece = events.popleft().text
                    pieces.append(piece)
                    size += len(piece)
                    self._taken += 1
                yield TextDelta("".join(pieces)) if len(pieces) > 1 else event
                continue
            if isinstance(event, BaseException):
                raise event
            yield event
            return  # Finished is the last event

    def _wake(self) -> None:
        self._wake_pending = False
        self._arrived.set()

    # --- the worker's side (worker thread): the TextSink a backend writes to ----------------

    def add_text(self, piece: str) -> None:
        if self._ended:
            return
        delta = self._assembler.push(piece)
        if delta:
            self._send(TextDelta(delta))

    @property
    def backlog(self) -> int:
        """Events sent and not yet taken by the RPC (what piles up while its client lags)."""
        return self._sent - self._taken

    def should_stop(self) -> bool:
        worker = self._worker  # called once per decode step, and once at admission
        if worker is not None and worker.step_gate is not None:
            worker.step_gate(self)
        now = time.monotonic()
        if worker is not None:
            worker.progress = now  # a sign of life for the watchdog
        if self._metrics is not None:
            if self._steps:
                self._metrics.inter_token_latency.observe(now - self.last_progress)
            if self._cancelled.is_set():
                self._metrics.tokens_after_end.inc()
        self._steps += 1
        self.last_progress = now
        if self.backlog > _BACKLOG and now - self.last_taken > self.abandon_after and not self._abandoned:
            request_id = self.request.request_id
            logger.warning(
                "request %s: the client stopped reading; stopping its generation",
                request_id,
                extra={"request_id": request_id},
            )
            self._abandoned = True
        if self._interrupted:
            self._stopped_by_interrupt = True
        return (
            self._cancelled.is_set() or self._abandoned or self._assembler.stopped or self._ended or self._interrupted
        )

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
        """Why the generation ended, stop strings and interrupts (the engine's) included."""
        if self._assembler.stopped:
            return FinishReason.STOP_SEQUENCE
        return FinishReason.INTERRUPTED if self._stopped_by_interrupt else outcome.reason

    def _abandon(self) -> None:
        """End a job the back-pressure guard stopped (worker thread): its client, if it reads again,
        learns why at once."""
        self._fail(
            ReaderStalled(
                f"the generation was stopped because the client read nothing for {self.abandon_after:g} s "
                f"while its output waited (request id {self.request.request_id})"
            )
        )

    def _finish(self, outcome: Outcome, reason: FinishReason) -> None:
        """Send the last text and :class:`Finished` (worker thread); nothing if the job already ended."""
        if self._ended:
            return
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
        self._end(Finished(reason, usage))

    def _fail(self, error: ServiceError) -> None:
        """End the job with ``error`` (any thread); nothing if it already ended."""
        self._end(error)

    def _end(self, event) -> None:
        with self._end_lock:
            if self._ended:
                return
            self._ended = True
        self._send(event)


class ModelWorker:
    """Runs one backend's requests one at a time in a dedicated thread."""

    #: A seam for tests: when set, it is called in the worker thread with the job at each of the job's
    #: stop checks (once per decode step, and once before its first), before the check itself. Tests use
    #: it to hold generation at a known step, or to pace it; the service never sets it.
    step_gate: Callable[[Job], None] | None = None

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
        # The watchdog's view: the time of the last sign of life (work taken, a decode step), and
        # whether the thread is working (holding the model) rather than waiting for a job.
        self.progress = time.monotonic()
        self.working = False
        self.stuck = False  # declared stuck by the watchdog: it takes no more jobs and is not joined
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
        """Whether the worker has work that a drain should wait for (a stuck worker has none it will finish)."""
        with self._lock:
            return not self.stuck and (bool(self._active) or bool(self._pending))

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

    def withdraw(self, job: Job) -> bool:
        """Remove a job that has not started; whether it was still waiting (then it never starts)."""
        with self._lock:
            try:
                self._pending.remove(job)
            except ValueError:
                return False
            return True

    def close(self) -> None:
        """Refuse new jobs; the thread exits once the queue is empty."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()

    def join(self, timeout: float | None = None) -> None:
        if not self.stuck:  # a stuck thread never returns; the process exits without it
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """Whether the worker's thread still runs (it may be inside a model call after a stop)."""
        return self._thread.is_alive()

    def silent_for(self, now: float) -> float:
        """Seconds the thread has worked without a sign of life (0 while it waits for work)."""
        return now - self.progress if self.working else 0.0

    def declare_stuck(self, stalled: ServiceError, unavailable: ServiceError) -> None:
        """The thread holds the model and makes no progress (called by the watchdog, another thread):
        its running jobs end with ``stalled``, the queued ones with ``unavailable``, and it takes no more."""
        with self._lock:
            self.stuck = self._closed = True
            running, queued = list(self._active), list(self._pending)
            self._pending.clear()
        for job in running:
            job._fail(stalled)
        for job in queued:
            job._fail(unavailable)

    def _take(self, room: int) -> list[Job] | None:
        """Up to ``room`` jobs that should start (waits for one if nothing runs); None: closed and done."""
        with self._lock:
            self.working = False
            while not self._pending and not self._active and not self._closed:
                self._lock.wait()
            if self.stuck or (not self._pending and not self._active):
                return None
            self.working, self.progress = True, time.monotonic()
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
        failure = None
        try:
            outcome = self.backend.generate(job.request, job if job.trace is None else _TracedSink(job))
        except Exception as exc:
            failure = exc
        if failure is not None:  # handled outside the except block, so its frames can be let go
            self._failed([job], failure)
            return
        self._finished(job, outcome)

    def _finished(self, job: Job, outcome: Outcome) -> None:
        elapsed = time.monotonic() - job.started_at
        previous = self.seconds_per_request
        self.seconds_per_request = elapsed if previous is None else 0.8 * previous + 0.2 * elapsed
        self.completed += 1
        reason = None if job.cancelled or job.abandoned else job.final_reason(outcome)
        if self.metrics is not None:
            self.metrics.tokens.inc(outcome.completion_tokens)
            self.metrics.prompt_tokens.inc(outcome.prompt_tokens)
            if reason is not None:
                self.metrics.finish_reasons[reason].inc()
        if job.trace is not None:
            job.trace.ended(time.monotonic(), reason, outcome.prompt_tokens, outcome.completion_tokens)
        if job.abandoned and not job.cancelled:
            job._abandon()
        elif reason is not None:
            job._finish(outcome, reason)

    def _failed(self, jobs: list[Job], exc: Exception) -> None:
        """End ``jobs`` after the generation step they shared raised ``exc`` (worker thread).

        Called outside the ``except`` block: the traceback's frames (and the tensors their locals hold)
        are dropped before memory is freed, once per failed step however many rows it had."""
        ids = ", ".join(job.request.request_id for job in jobs)
        oom, fatal = is_out_of_memory(exc), is_fatal_device_error(exc)
        extra = {"request_id": ids}
        if oom:
            logger.error("request(s) %s on model %s ran out of memory; freeing it", ids, self.name, extra=extra)
        else:
            logger.error("request(s) %s on model %s failed", ids, self.name, exc_info=exc, extra=extra)
        now = time.monotonic()
        for job in jobs:
            if job.trace is not None:
                job.trace.ended(now, error=exc)
        drop_traceback(exc)
        if oom:
            free_memory()
        for job in jobs:
            job._fail(OutOfMemory(job.request.request_id) if oom else GenerationFailed(job.request.request_id))
        if fatal and self._on_fatal is not None:
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
                self.progress = time.monotonic()
                failure = None
                try:
                    row = batch.admit(job.request, job)
                except Exception as exc:
                    failure = exc
                if failure is not None:
                    self._failed([job], failure)
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
            self.progress = time.monotonic()
            failure = None
            try:
                finished = batch.step()
            except Exception as exc:
                failure = exc
            if failure is not None:
                # A failed step leaves no row in a known state: each gets the error, the batch starts over.
                jobs = [row.sink for row in batch.abort()]  # each row's sink is its Job
                self._failed(jobs, failure)
                for job in jobs:
                    self._done(job)
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
