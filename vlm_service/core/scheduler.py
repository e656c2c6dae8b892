"""The scheduler: one per served model, a bounded queue and the one thread that runs the model.

Its thread drives the :class:`~vlm_service.backends.base.Batch` that the model's backend made, the
same loop for every family: take waiting jobs while the batch has room (each joins it: its prompt is
processed alone and its first output written; a batch that processes prompts in chunks runs them for
up to ``prefill_budget`` seconds, then the rows already decoding get their step), then one decode
step for every row; a row leaves the
batch the step it ends, so it stops costing compute at once, and the other rows go on. The loop knows
nothing of a family: the transformers families decode many rows together, Moondream one at a time.

Rules:

- The event loop never blocks here: :meth:`Scheduler.enqueue` appends to a deque under a short lock, or
  refuses at once (:class:`QueueFull`, :class:`ShuttingDown`).
- The model runs only in this thread: families that keep per-instance state (Moondream's KV cache) are
  never entered twice.
- One failure path: a join, a chunk of a prefill or a decode step that raises ends every request it touched (one, or every
  row of the batch) with the error the client sees; device_failures.py says what the error means for
  the device (out of memory: memory freed; fatal: the model stops serving).
- A job whose RPC has ended never starts; a running one stops at its next decode step (its batch row
  asks the job at each step, see job.py). A job interrupted while queued is withdrawn
  (:meth:`Scheduler.withdraw`) and never starts either.
- The engine's watchdog reads :attr:`Scheduler.progress` (the last sign of life: work taken, a stop
  check) and declares a scheduler that works without one for too long stuck (:meth:`declare_stuck`).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

from vlm_service.backends.base import Batch, Outcome
from vlm_service.core.device_failures import DeviceFailure, recover
from vlm_service.core.job import Job
from vlm_service.errors import DeadlineExpired, GenerationFailed, OutOfMemory, QueueFull, ServiceError, ShuttingDown
from vlm_service.observability.metrics import ModelMetrics

logger = logging.getLogger(__name__)

#: How early grpc may end an RPC at its deadline, against the deadline the servicer computed from the
#: RPC's remaining time when it arrived (6 ms early measured): a withdrawal that close counts as expired.
DEADLINE_SLACK = 0.05


class Scheduler:
    """Runs one model's requests, through the batch its backend made, in a dedicated thread."""

    #: A seam for tests: when set, it is called in the scheduler thread with the job at each of the
    #: job's stop checks (once per decode step, and once before each chunk of its prefill: once before
    #: a prefill in one piece), before the check itself.
    #: Tests use it to hold generation at a known step, or to pace it; the service never sets it.
    step_gate: Callable[[Job], None] | None = None

    def __init__(
        self,
        name: str,
        batch: Batch,
        max_queue: int,
        on_fatal: Callable[[str], None] | None = None,
        metrics: ModelMetrics | None = None,
        prefill_budget: float = 0.25,
        torch_threads: int | None = None,
    ):
        self.name = name
        self.batch = batch
        self.metrics = metrics
        self.prefill_budget = prefill_budget  # seconds of prefill chunks between decode steps
        self.torch_threads = torch_threads  # this thread's intra-op threads (None: as torch has them)
        self.max_queue = max_queue
        self._on_fatal = on_fatal
        self.seconds_per_request: float | None = None  # moving average of generation times
        self._pending: collections.deque[Job] = collections.deque()  # waiting for the model
        self._lock = threading.Condition()
        self._closed = False
        self._active: list[Job] = []  # started and not ended
        # The watchdog's view: the time of the last sign of life (work taken, a stop check), and
        # whether the thread is working (holding the model) rather than waiting for a job.
        self.progress = time.monotonic()
        self.working = False
        self.stuck = False  # declared stuck by the watchdog: it takes no more jobs and is not joined
        self._thread = threading.Thread(target=self._run, name=f"vlm-scheduler-{name}", daemon=True)
        self._thread.start()

    # --- the engine's side (event loop, metrics, watchdog) --------------------------------------

    @property
    def slots(self) -> int:
        """Requests decoded at once."""
        return self.batch.max_rows

    @property
    def queue_depth(self) -> int:
        """Requests waiting for the model."""
        with self._lock:
            return len(self._pending)

    @property
    def running(self) -> int:
        with self._lock:
            return len(self._active)

    def estimated_wait(self) -> float | None:
        """Seconds until a request queued now would start, from recent generation times."""
        if self.seconds_per_request is None:
            return None
        with self._lock:  # a cancelled job runs no more (or at most one more step): it is not ahead of anyone
            ahead = sum(1 for queue in (self._pending, self._active) for job in queue if not job.cancelled)
        return ahead // self.slots * self.seconds_per_request  # a slot frees about every request's time

    @property
    def busy(self) -> bool:
        """Whether it has work that a drain should wait for (a stuck one has none it will finish)."""
        with self._lock:
            return not self.stuck and bool(self._active or self._pending)

    def enqueue(self, job: Job) -> None:
        """Queue a job, or raise QueueFull / ShuttingDown at once. Never blocks on the model."""
        with self._lock:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            waiting = len(self._pending)
            if waiting >= self.max_queue:
                raise QueueFull(f"model {self.name!r} has {waiting} requests waiting (the limit); retry later")
            job._on_check, job._on_wait, job._on_withdraw = self._checked, self._alive, self.withdraw
            self._pending.append(job)
            self._lock.notify()

    def withdraw(self, job: Job) -> bool:
        """Remove a job that has not started (its RPC ended, or something newer replaced it); whether it
        was still waiting (then it never starts)."""
        with self._lock:
            if job not in self._pending:
                return False
            self._pending.remove(job)
        deadline = job.request.deadline
        if deadline is not None and time.monotonic() >= deadline - DEADLINE_SLACK:  # ended at its deadline, queued
            self._expired(job, time.monotonic())
        return True

    def close(self) -> None:
        """Refuse new jobs; the thread exits once the queue is empty and the batch has ended."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()

    def join(self, timeout: float | None = None) -> None:
        if not self.stuck:  # a stuck thread never returns; the process exits without it
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """Whether the thread still runs (it may be inside a model call after a stop)."""
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
            job.fail(stalled)
        for job in queued:
            job.fail(unavailable)

    # --- the loop (scheduler thread) ----------------------------------------------------------

    def _checked(self, job: Job) -> None:
        """A job's stop check: a sign of life, after the tests' step gate (if any) lets it through."""
        gate = self.step_gate
        if gate is not None:
            gate(job)
        self.progress = time.monotonic()

    def _alive(self) -> None:
        """A sign of life from a job waiting for something other than the model (see ``Job.waiting``)."""
        self.progress = time.monotonic()

    def _take(self, room: int) -> list[Job] | None:
        """Up to ``room`` waiting jobs that should start (waits for one if nothing runs); None: closed
        and done. A job whose deadline passed while it waited ends here (DEADLINE_EXCEEDED)."""
        with self._lock:
            self.working = False
            while not self._pending and not self._active and not self._closed:
                self._lock.wait()
            if self.stuck or (not self._pending and not self._active):
                return None
            self.working, self.progress = True, time.monotonic()
            taken, expired = [], []
            while self._pending and len(taken) < room:
                job = self._pending.popleft()
                if job.cancelled:
                    continue
                if job.request.deadline is not None and self.progress >= job.request.deadline:
                    expired.append(job)
                else:
                    taken.append(job)
                    self._active.append(job)
        for job in expired:
            self._expired(job, self.progress)
        return taken

    def _expired(self, job: Job, now: float) -> None:
        """``job``'s deadline passed before it started (seen here, or its RPC ended at the deadline and
        withdrew it): it ends with DEADLINE_EXCEEDED, counted and traced, once."""
        waited = now - job.request.arrival
        error = DeadlineExpired(f"the deadline passed after {waited:.2f} s in the queue of model {self.name!r}")
        job.timeline.expired(now, error)
        job.fail(error)

    def _run(self) -> None:
        batch = self.batch
        if self.torch_threads:  # torch keeps a thread count per thread: this model's, whatever loads after
            import torch

            torch.set_num_threads(self.torch_threads)
        try:
            while (new := self._take(batch.room)) is not None:
                for job in new:
                    self._join(job)
                if batch.joining:
                    self._prefill()
                if len(batch):
                    self._decode_step()
        finally:
            batch.abort()  # nothing is left in it unless the model was stuck; let go of what it holds

    def _join(self, job: Job) -> None:
        self.progress = time.monotonic()
        job.timeline.started(self.progress)
        failure = None
        joining_before = self.batch.joining
        try:
            outcome = self.batch.join(job.request, job)
        except Exception as exc:
            failure = exc
        if failure is not None:  # handled outside the except block, so its frames can be let go
            self._failed([job], failure)
            return
        if outcome is None and self.batch.joining > joining_before:
            return  # queued: its prompt is processed in chunks (_prefill), its first output comes then
        # Prefilled inside join() (and, with an outcome, answered whole): its first token, if it has one.
        job.timeline.prefilled(time.monotonic(), outcome)
        if outcome is not None:
            self._finished(job, outcome)

    def _prefill(self) -> None:
        """Prefill work for the joining requests (chunks, oldest first, or several prompts at once),
        until they are all in or, while other requests are decoding, ``prefill_budget`` seconds have run
        (at least one step): the streams already running wait for one slice of a new request's
        prefill, never all of it."""
        batch = self.batch
        until = time.monotonic() + self.prefill_budget
        while batch.joining:
            jobs = batch.next_prefill
            failure = None
            try:
                results = batch.prefill_step()
            except Exception as exc:
                failure = exc
            self.progress = time.monotonic()
            if failure is not None:  # only these requests are touched: they have left the batch
                self._failed(jobs, failure)
            else:
                for job, outcome, joined in results:  # each sink is its job
                    if joined:
                        job.timeline.prefilled(self.progress, outcome)
                        if outcome is not None:
                            self._finished(job, outcome)
            if len(batch) and self.progress >= until:
                return

    def _decode_step(self) -> None:
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(self.batch))
        self.progress = time.monotonic()
        # The rows in this step: the requests past their first token (the others are still joining),
        # and whether each one's RPC had already ended (a token for nobody).
        rows = [(job, job.cancelled) for job in self._active if job.timeline.first_token_at is not None]
        failure = None
        try:
            ended = self.batch.decode_step()
        except Exception as exc:
            failure = exc
        if failure is not None:
            # A failed step leaves no row in a known state: each gets the error, the batch starts over.
            # Requests still joining were not in the step; they go on, unless memory ran out (then
            # every tensor the batch holds goes, theirs too, before memory is freed).
            oom = DeviceFailure.of(failure).out_of_memory
            self._failed(self.batch.abort(joining=oom), failure)
            return
        now = time.monotonic()
        for job, after_end in rows:
            job.timeline.decoded(now, after_end)
        for job, outcome in ended:  # each row's sink is its job
            self._finished(job, outcome)

    def _finished(self, job: Job, outcome: Outcome) -> None:
        now = time.monotonic()
        elapsed = now - job.timeline.started_at
        previous = self.seconds_per_request
        self.seconds_per_request = elapsed if previous is None else 0.8 * previous + 0.2 * elapsed
        reason = None if job.cancelled or job.abandoned else job.final_reason(outcome)
        job.timeline.ended(now, outcome, reason)
        if job.abandoned and not job.cancelled:
            job.end_abandoned()
        elif reason is not None:
            job.finish(outcome, reason)
        self._done(job)

    def _failed(self, jobs: list[Job], exc: Exception) -> None:
        """The one failure path: end ``jobs`` after the join or decode step they shared raised ``exc``.

        Called outside the ``except`` block: the traceback's frames (and the tensors their locals hold)
        are dropped before memory is freed, once per failed call however many rows it had."""
        ids = ", ".join(job.request.request_id for job in jobs)
        failure = DeviceFailure.of(exc)
        extra = {"request_id": ids}
        if failure.out_of_memory:
            logger.error("request(s) %s on model %s ran out of memory; freeing it", ids, self.name, extra=extra)
        else:
            logger.error("request(s) %s on model %s failed", ids, self.name, exc_info=exc, extra=extra)
        now = time.monotonic()
        for job in jobs:
            job.timeline.ended(now, error=exc)
        recover(exc, failure)
        for job in jobs:
            request_id = job.request.request_id
            job.fail(OutOfMemory(request_id) if failure.out_of_memory else GenerationFailed(request_id))
            self._done(job)
        if failure.fatal and self._on_fatal is not None:
            self._on_fatal(self.name)

    def _done(self, job: Job) -> None:
        with self._lock:
            self._active.remove(job)
