"""Watch: answering about a live feed, one frame at a time (the session behind the Watch RPC).

A :class:`WatchSession` holds one Watch stream's state; it knows nothing of protobuf.

* A reader task takes the caller's frames as fast as they come, so gRPC never buffers them. At most
  one frame waits (``pending``): a newer frame replaces it, and the replaced one is skipped.
* A waiting frame's image is decoded off the event loop (:class:`~vlm_service.images.decode.ImageDecoder`)
  when its turn comes: under LATEST once the current answer has ended (so the frames that are skipped
  cost nothing); under INTERRUPT at once.
* Under INTERRUPT a newer frame interrupts the running answer as it arrives
  (:meth:`~vlm_service.core.job.Job.interrupt`: the job stops at its next stop check, within one decode
  step, and ends with ``FinishReason.INTERRUPTED``), while its image is decoded; so does a frame that
  becomes ready while an answer that began after it arrived is written. A frame whose image then turns
  out bad gets its error message; the answer it stopped stays stopped.
* A decoded frame's answer is submitted at once through the engine's public API (so it joins the
  model's decode batch and uses its image cache like any Caption or Query): the model's scheduler takes it
  as soon as it has room, under INTERRUPT at the step where the answer it replaces stops. The frame is then
  ``ready``, and the session's loop (:meth:`WatchSession.run`) streams its job's events once the answer
  before it is out. A ready frame replaced by a newer one before its turn is skipped, its job released.

The stream holds one of ``--max-streams`` for its whole life (:meth:`Engine.open_stream`), and its jobs
count under it. The messages of one frame are never interleaved with another frame's: an error about a
newer frame waits until the current answer's last message is out.

Each frame's fate is counted once (``vlm_watch_frames_total{outcome}``): answered, interrupted,
skipped, rejected (an error message), or unanswered (the stream ended before it). Each answer's last
event, and each refused frame's, says how many frames were skipped since the previous answered or
refused frame: the frames that this one replaced, directly or through the frames it replaced.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import enum
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from PIL import Image

from vlm_service.errors import GenerationFailed, InvalidInput, OutOfMemory, QueueFull, ServiceError
from vlm_service.types import Finished, FinishReason, GenerationRequest, TextDelta

if TYPE_CHECKING:
    from vlm_service.core.engine import Engine
    from vlm_service.core.job import Job
    from vlm_service.images.decode import ImageDecoder
    from vlm_service.observability.tracing import Tracing

logger = logging.getLogger(__name__)

#: Errors that concern one frame and leave the stream and its model serving: that frame gets one error
#: message and the stream goes on. Any other error ends the stream with its status.
FRAME_ERRORS = (InvalidInput, QueueFull, OutOfMemory, GenerationFailed)

#: Error messages about refused frames that may wait to be sent (while the client reads slowly); beyond
#: it the stream stops reading frames until they are sent, so a flood of bad frames cannot grow memory.
_REJECTIONS_WAITING = 64

#: What becomes of a frame (the ``outcome`` label of ``vlm_watch_frames_total``).
OUTCOMES = ("answered", "interrupted", "skipped", "rejected", "unanswered")


class WatchPolicy(enum.Enum):
    LATEST = "latest"  # the current answer runs to its end; then the newest frame is answered
    INTERRUPT = "interrupt"  # a newer frame stops the current answer and is answered at once


@dataclass(frozen=True)
class WatchConfig:
    """A validated Watch configuration: what each frame's answer asks (a request less its image)."""

    request: GenerationRequest
    policy: WatchPolicy = WatchPolicy.LATEST


@dataclass(frozen=True)
class Frame:
    """One frame as it arrived: the caller's id, its encoded image (None: the message had none), and
    when it arrived (its answer's usage is measured from then)."""

    frame_id: int
    data: bytes | None
    arrival: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class FrameText:
    """Text of a frame's answer, written since the previous event about that frame; never empty."""

    frame_id: int
    text: str


@dataclass(frozen=True)
class FrameAnswered:
    """The last event of a frame's answer: why it ended, its usage, and the frames skipped since the
    previous answered or refused frame."""

    frame_id: int
    finished: Finished
    frames_skipped: int


@dataclass(frozen=True)
class FrameRejected:
    """The one event about a frame that could not be answered (a bad image or frame id, a full queue,
    a model failure on it), with the frames skipped since the previous answered or refused frame; the
    stream goes on."""

    frame_id: int
    error: ServiceError
    frames_skipped: int = 0


WatchEvent = FrameText | FrameAnswered | FrameRejected


@dataclass(eq=False)
class _Waiting:
    """A frame on its way to an answer: waiting, being decoded, or decoded (``image`` set)."""

    frame: Frame
    superseded: int = 0  # frames it replaced, directly or through the frames it replaced
    image: Image.Image | None = None
    digest: str = ""
    job: Job | None = None  # its answer, submitted once it is decoded


class WatchSession:
    """One Watch stream. Create it (which checks the configuration against the model and takes a stream
    slot, raising a ServiceError at once if either fails), iterate :meth:`run` over the caller's frames,
    and :meth:`close` it when the RPC ends, however it ends."""

    def __init__(
        self,
        engine: Engine,
        decoder: ImageDecoder,
        config: WatchConfig,
        *,
        request_id: str,
        deadline: float | None = None,
        tracing: Tracing | None = None,
    ):
        self.engine = engine
        self.decoder = decoder
        self.policy = config.policy
        self.request_id = request_id
        self._template = engine.check(config.request)  # NOT_FOUND, INVALID_ARGUMENT, UNAVAILABLE
        self.model = engine.model_name(self._template.model)
        self._image_bound = engine.image_bound(self.model, self._template.detail)  # every frame's reduction
        self._deadline = deadline
        self._tracing = tracing
        metrics = engine.metrics
        self._received = metrics.watch_frames_received.labels(self.model)
        self._outcomes = {outcome: metrics.watch_frames.labels(self.model, outcome) for outcome in OUTCOMES}
        self._last_id: int | None = None
        self._pending: _Waiting | None = None  # the newest frame not yet taken for decoding
        self._decoding: asyncio.Task | None = None
        self._decoding_frame: _Waiting | None = None
        self._ready: _Waiting | None = None  # decoded, not yet answered
        self._job: Job | None = None  # the answer being written
        self._rejected: collections.deque[FrameRejected] = collections.deque()
        self._room = asyncio.Event()  # set when a waiting error message has been sent
        self._input_ended = False
        self._failure: BaseException | None = None
        self._changed = asyncio.Event()
        self._reader: asyncio.Task | None = None
        self._closed = False
        # For the RPC's access line: totals over the answers.
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.first_text_at: float | None = None
        self._slot = engine.open_stream()  # last: nothing to give back if anything above raised

    # --- the stream ---------------------------------------------------------------------------------

    async def run(self, frames: AsyncIterator[Frame]) -> AsyncIterator[WatchEvent]:
        """Answer ``frames`` (the caller's, after the config) until they end and every answer due is
        written. Raises the ServiceError that ends the stream (a protocol error in ``frames``, a model
        that stopped serving, a drain)."""
        self._reader = asyncio.create_task(self._read(frames), name=f"watch-reader-{self.request_id}")
        try:
            while True:
                while self._rejected:
                    yield self._rejected.popleft()
                    self._room.set()
                if self._failure is not None:
                    raise self._failure
                if self._ready is not None:
                    waiting, self._ready = self._ready, None
                    async for event in self._answer(waiting):
                        yield event
                    continue
                self._decode_next()
                if self._input_ended and self._pending is None and self._decoding is None:
                    return
                self._changed.clear()  # nothing changed since the checks above: no await between them
                await self._changed.wait()
        finally:
            self.close()

    def close(self) -> None:
        """The stream ended (finished, failed, cancelled, deadline): stop its answer, its reading and
        decoding, and give back its slot. Idempotent; safe from the RPC's done callback."""
        if self._closed:
            return
        self._closed = True
        unanswered = sum(w is not None for w in (self._pending, self._decoding_frame, self._ready))
        unanswered += self._job is not None
        if unanswered:
            self._outcomes["unanswered"].inc(unanswered)
        if self._ready is not None:
            self.engine.release(self._ready.job)
        self._pending = self._ready = self._decoding_frame = None
        if self._job is not None:
            self.engine.release(self._job)
            self._job = None
        for task in (self._reader, self._decoding):
            if task is not None and not task.done():
                task.cancel()
        self.engine.close_stream(self._slot)

    # --- reading frames -----------------------------------------------------------------------------

    async def _read(self, frames: AsyncIterator[Frame]) -> None:
        try:
            async for frame in frames:
                self._take(frame)
                while len(self._rejected) >= _REJECTIONS_WAITING:  # read on once they are sent
                    self._room.clear()
                    await self._room.wait()
        except Exception as exc:  # a protocol error (InvalidInput), or reading failed: the stream ends
            self._fail(exc)
        else:
            self._input_ended = True
            self._wake()

    def _take(self, frame: Frame) -> None:
        self._received.inc()
        if self._last_id is not None and frame.frame_id <= self._last_id:
            self._reject(
                frame.frame_id,
                InvalidInput(
                    "frame.frame_id",
                    f"{frame.frame_id} is not greater than the previous frame's id {self._last_id}; "
                    "frame ids must increase (the frame was not used)",
                ),
            )
            return
        self._last_id = frame.frame_id
        if frame.data is None:
            self._reject(frame.frame_id, InvalidInput("frame.image", "an image is required"))
            return
        waiting = _Waiting(frame)
        if self._pending is not None:  # at most one frame waits: the newer one replaces it
            waiting.superseded = self._pending.superseded + 1
            self._outcomes["skipped"].inc()
        self._pending = waiting
        if self.policy is WatchPolicy.INTERRUPT:
            if self._job is not None:  # the newer frame stops the current answer at its next decode step
                self._job.interrupt()
            self._decode_next()
        self._wake()

    def _fail(self, error: BaseException) -> None:
        """End the stream with ``error``: the running answer stops within a decode step, and run() raises."""
        if self._failure is None:
            self._failure = error
        if self._job is not None:
            self._job.interrupt()
        self._wake()

    # --- decoding -----------------------------------------------------------------------------------

    def _decode_next(self) -> None:
        """Start decoding the waiting frame, if it is its turn: one decode at a time; under LATEST only
        while no answer is written or ready (frames that will be skipped are never decoded)."""
        if self._closed or self._decoding is not None or self._pending is None:
            return
        if self.policy is WatchPolicy.LATEST and (self._job is not None or self._ready is not None):
            return
        waiting, self._pending = self._pending, None
        self._decoding_frame = waiting
        self._decoding = asyncio.create_task(self._decode(waiting))

    async def _decode(self, waiting: _Waiting) -> None:
        try:
            waiting.image, waiting.digest = await self.decoder.decode(waiting.frame.data, self._image_bound)
        except InvalidInput as exc:
            self._reject(waiting.frame.frame_id, exc.under("frame"), waiting.superseded)
        except QueueFull as exc:  # too many images wait to be decoded, server-wide
            self._reject(waiting.frame.frame_id, exc, waiting.superseded)
        except Exception as exc:
            self._fail(exc)
        else:
            if self._submit(waiting):
                replaced = self._ready
                if replaced is not None:  # decoded, its answer not yet streamed: the newer one replaces it
                    waiting.superseded += replaced.superseded + 1
                    self._outcomes["skipped"].inc()
                    self.engine.release(replaced.job)
                self._ready = waiting
                if self.policy is WatchPolicy.INTERRUPT and self._job is not None:  # one that began meanwhile
                    self._job.interrupt()
        finally:
            if self._decoding_frame is waiting:
                self._decoding, self._decoding_frame = None, None
                self._decode_next()  # under INTERRUPT, the frame that arrived meanwhile
                self._wake()

    def _submit(self, waiting: _Waiting) -> bool:
        """Queue the decoded frame's answer at once, before its turn to stream: the scheduler takes it
        as soon as it has room (under INTERRUPT, the step at which the answer it replaces stops), and its
        text waits in the job until the answers before it are out. False if it was refused (it then has
        its error message) or the stream ends."""
        if self._closed:
            return False
        frame = waiting.frame
        request = dataclasses.replace(
            self._template,
            request_id=f"{self.request_id}:{frame.frame_id}",
            image=waiting.image,
            image_digest=waiting.digest,
            arrival=frame.arrival,
            deadline=self._deadline,
        )
        waiting.image = None  # the job holds the picture while it needs it
        trace = None
        if self._tracing is not None:
            trace = self._tracing.generation(self.model, request.request_id, frame.arrival)
        try:
            waiting.job = self.engine.submit(request, trace=trace, stream=self._slot)
        except FRAME_ERRORS as exc:  # the model's queue is full: this frame is not answered
            self._reject(frame.frame_id, exc, waiting.superseded)
            return False
        except Exception as exc:  # the stream ends (a drain, the model stopped serving)
            self._outcomes["unanswered"].inc()
            self._fail(exc)
            return False
        return True

    def _reject(self, frame_id: int, error: ServiceError, superseded: int = 0) -> None:
        self._rejected.append(FrameRejected(frame_id, error, superseded))
        self._outcomes["rejected"].inc()
        self._wake()

    def _wake(self) -> None:
        self._changed.set()

    # --- answering ----------------------------------------------------------------------------------

    async def _answer(self, waiting: _Waiting) -> AsyncIterator[WatchEvent]:
        """Stream the ready frame's answer (its job was submitted when it was decoded)."""
        frame, job, skipped = waiting.frame, waiting.job, waiting.superseded
        self._job = job
        try:
            async for event in job.events():
                if self._failure is not None:
                    raise self._failure
                if isinstance(event, TextDelta):
                    if self.first_text_at is None:
                        self.first_text_at = time.monotonic()
                    yield FrameText(frame.frame_id, event.text)
                    continue
                self._job = None  # answered: not counted as unanswered if the stream ends now
                self._decode_next()  # the next frame's decoding need not wait for this message's write
                interrupted = event.reason is FinishReason.INTERRUPTED
                self._outcomes["interrupted" if interrupted else "answered"].inc()
                self.prompt_tokens += event.usage.prompt_tokens
                self.completion_tokens += event.usage.completion_tokens
                yield FrameAnswered(frame.frame_id, event, skipped)
        except FRAME_ERRORS as exc:  # out of memory, or the model failed on this frame
            self._job = None
            self._outcomes["rejected"].inc()
            yield FrameRejected(frame.frame_id, exc, skipped)
        finally:
            # Ended any other way (the stream failed or was closed), ``_job`` stays set: close() counts the
            # frame as unanswered.
            self.engine.release(job)
