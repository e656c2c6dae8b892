"""A request's output stream: the bridge from the model's scheduler thread to its RPC on the event loop.

A :class:`Job` is what the engine hands the RPC (``Engine.submit``), and the :class:`TextSink` the
request's batch row writes to. Rules:

- The event loop never blocks here: events cross in a deque, and the scheduler thread wakes the RPC's
  handler with ``loop.call_soon_threadsafe`` once per burst of events, not once per token.
- Raw text goes through the request's :class:`~vlm_service.core.text.TextAssembler` (stop strings,
  whitespace, role words) before it is sent; what piles up while the client lags goes out merged.
- A job is owned by its RPC: when the RPC ends (finished, cancelled, deadline, disconnect) the handler
  calls :meth:`Job.cancel`; a queued job is dropped before it starts and a running one stops at its
  next decode step (:meth:`Job.should_stop`, which the batch asks once per step).
- :meth:`Job.interrupt` stops a job the same way while its RPC still listens (a Watch stream's newer
  frame replaces it): it ends with :class:`Finished` and ``FinishReason.INTERRUPTED``.
- Every job that its RPC did not end gets exactly one last event: :class:`Finished` or the error that
  ended it, however many threads try to end it (the scheduler, the engine's watchdog).
- A client that reads nothing for ``abandon_after`` seconds while output piles up has gone: its
  generation is stopped (back-pressure), and if it reads again it learns why at once.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from vlm_service.backends.base import Outcome, RegionParser
from vlm_service.core.text import TextAssembler
from vlm_service.core.timeline import Timeline
from vlm_service.errors import ReaderStalled, ServiceError
from vlm_service.observability.metrics import ModelMetrics
from vlm_service.types import Finished, FinishReason, GenerationRequest, Malformed, Region, TextDelta

if TYPE_CHECKING:
    from vlm_service.observability.tracing import GenerationTrace

logger = logging.getLogger(__name__)

#: Undelivered events beyond which a client that reads nothing counts as gone.
_BACKLOG = 32
#: Characters of piled-up text merged into one message at most (UTF-8: at most 4 bytes each), well
#: under the transport's 4 MiB message limit.
_MERGE_LIMIT = 256 * 1024


class Job:
    """One request's generation as its RPC sees it: an async stream of events (:meth:`events`) and a
    switch to stop it (:meth:`cancel`)."""

    def __init__(
        self,
        request: GenerationRequest,
        loop: asyncio.AbstractEventLoop,
        role_prefixes=(),
        abandon_after: float = 40.0,
        metrics: ModelMetrics | None = None,
        trace: GenerationTrace | None = None,
        regions: RegionParser | None = None,
    ):
        self.request = request
        self.timeline = Timeline(request.arrival, metrics, trace)  # its phases, stamped once each
        self._loop = loop
        # Events cross from the scheduler thread in a deque; the loop is woken at most once per batch of
        # them (``_wake_pending``), so a busy batch does not flood the loop with one wake-up per token.
        self._events: collections.deque = collections.deque()
        self._arrived = asyncio.Event()
        self._wake_pending = False
        self._cancelled = threading.Event()
        # Back-pressure: the RPC takes events only as fast as the client reads them. A client that
        # reads nothing for ``abandon_after`` seconds while output piles up has gone: stop generating.
        self.abandon_after = abandon_after
        self.last_taken = time.monotonic()
        self._sent = 0  # events sent (written by the scheduler thread only)
        self._taken = 0  # events taken (written by the event loop only)
        self._assembler = TextAssembler(request.params.stop, role_prefixes)
        # A grounding request: its model's text (or the regions its family sends itself) become
        # Region events, at most request.max_objects of them.
        self._regions = regions
        self._found = 0
        # Set by the scheduler that queues it: called at each stop check, and to take it out of the queue
        # (whether it was still there: then it never starts).
        self._on_check: Callable[[Job], None] | None = None
        self._on_wait: Callable[[], None] | None = None
        self._on_withdraw: Callable[[Job], bool] | None = None
        self._abandoned = False  # the back-pressure guard stopped it (its RPC still listens)
        self._ended = False  # a last event (Finished or an error) was sent
        self._end_lock = threading.Lock()  # the scheduler and the watchdog may both try to end it
        self._interrupted = False  # interrupt() was called: stop, and end with FinishReason.INTERRUPTED
        self._stopped_by_interrupt = False  # a stop check saw the interrupt (scheduler thread)

    # --- the RPC's side (event loop) ---------------------------------------------------------

    def cancel(self) -> None:
        """Stop this job: a queued job never starts, a running one stops at its next decode step."""
        if not self._cancelled.is_set():
            self._cancelled.set()
            if self._on_withdraw is not None:
                self._on_withdraw(self)

    def interrupt(self) -> None:
        """Stop this job early because something newer replaces it (a Watch stream's newer frame).

        Unlike :meth:`cancel`, its RPC still listens: the job ends with :class:`Finished` and
        ``FinishReason.INTERRUPTED`` (the text so far, its usage). A running job stops at its next stop
        check, within one decode step; a queued one ends at once and never starts."""
        if self._interrupted or self._ended or self._cancelled.is_set():
            return
        self._interrupted = True
        withdraw = self._on_withdraw
        if withdraw is not None and withdraw(self):
            self.finish(Outcome(0, 0, FinishReason.INTERRUPTED), FinishReason.INTERRUPTED)

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

    async def events(self) -> AsyncIterator[TextDelta | Region | Malformed | Finished]:
        """Text deltas as they are written (a grounding request: regions, and malformed output, as each
        is decoded), then one :class:`Finished`; raises a ServiceError on failure.

        Every job that its RPC did not end gets exactly one last event: :class:`Finished`, or the error
        that ended it (a failed or stuck model, see scheduler.py and the engine's watchdog, or the
        back-pressure guard), so a reader that resumes after a pause gets the job's true outcome.
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
            if isinstance(event, Finished):
                return  # the last event

    def _wake(self) -> None:
        self._wake_pending = False
        self._arrived.set()

    # --- the scheduler's side (scheduler thread): the TextSink a batch row writes to ------------

    def add_text(self, piece: str) -> None:
        if self._ended:
            return
        if self.request.task.grounding:
            if self._regions is not None:
                for found in self._regions.push(piece):
                    self._found_one(found)
            return  # a family that sends regions itself writes no text that counts
        delta = self._assembler.push(piece)
        if delta:
            self._send(TextDelta(delta))

    def add_region(self, region: Region) -> None:
        """One object found (a family that sends regions itself); those past max_objects are dropped."""
        if not self._ended:
            self._found_one(region)

    def _found_one(self, found: Region | Malformed) -> None:
        if isinstance(found, Region):
            if self._found >= self.request.max_objects:
                return
            self._found += 1
        self._send(found)

    @property
    def found_all(self) -> bool:
        """A grounding request has its max_objects regions: its generation should stop."""
        return self.request.task.grounding and self._found >= self.request.max_objects

    @property
    def backlog(self) -> int:
        """Events sent and not yet taken by the RPC (what piles up while its client lags)."""
        return self._sent - self._taken

    def waiting(self) -> bool:
        """A sign of life while its row waits for something other than the model (another model's
        lock), for the watchdog; whether to stop waiting: its RPC ended or something newer replaced it.
        Not a stop check: it counts no step and records no latency."""
        if self._on_wait is not None:
            self._on_wait()
        return self._cancelled.is_set() or self._interrupted or self._ended

    def should_stop(self) -> bool:
        """Whether the row should end now (cancelled, interrupted, abandoned, a stop string, already
        ended). Asked once per decode step, and once before each chunk of the prefill."""
        if self._on_check is not None:  # a sign of life for the watchdog (and the tests' step gate)
            self._on_check(self)
        now = time.monotonic()
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
            self._cancelled.is_set()
            or self._abandoned
            or self._assembler.stopped
            or self._ended
            or self._interrupted
            or self.found_all
        )

    def _send(self, event) -> None:
        if isinstance(event, TextDelta | Region) and self.timeline.first_text_at is None:
            self.timeline.first_text(time.monotonic())
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
        if self.found_all:
            return FinishReason.MAX_OBJECTS
        return FinishReason.INTERRUPTED if self._stopped_by_interrupt else outcome.reason

    def end_abandoned(self) -> None:
        """End a job the back-pressure guard stopped (scheduler thread): its client, if it reads again,
        learns why at once."""
        self.fail(
            ReaderStalled(
                f"the generation was stopped because the client read nothing for {self.abandon_after:g} s "
                f"while its output waited (request id {self.request.request_id})"
            )
        )

    def finish(self, outcome: Outcome, reason: FinishReason) -> None:
        """Send the last text and :class:`Finished` (scheduler thread); nothing if the job already ended."""
        if self._ended:
            return
        if self._regions is not None:
            for malformed in self._regions.finish():
                self._send(malformed)
        elif not self.request.task.grounding:
            tail = self._assembler.finish()
            if tail:
                self._send(TextDelta(tail))
        self._end(Finished(reason, self.timeline.usage(outcome)))

    def fail(self, error: ServiceError) -> None:
        """End the job with ``error`` (any thread); nothing if it already ended."""
        self._end(error)

    def _end(self, event) -> None:
        with self._end_lock:
            if self._ended:
                return
            self._ended = True
        self._send(event)
