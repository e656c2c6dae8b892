"""The backend base class: what a model family implements, and the batch its scheduler drives.

Lifecycle, driven by the engine (one instance per served model):

1. ``__init__(spec, runtime)`` stores the model's source and the runtime choices; it loads nothing.
2. ``load()`` runs once, off the event loop, before any request: load weights and processors.
3. ``new_batch(max_rows)`` makes the one :class:`Batch` that the model's scheduler (core/scheduler.py)
   drives for as long as the model serves, in the model's one thread: requests join it between
   decode steps and leave it the step they end. The family owns its batch: the transformers families
   decode many rows together (:class:`~vlm_service.backends.decode_batch.DecodeBatch`); Moondream
   keeps one row whose step pulls one piece from its remote code's generator.
4. ``generate(request, out)`` answers one request alone (the warm-up uses it).

A family implements ``new_batch`` or ``generate``, or both: by default each is made of the other, so
a family that can only write whole answers implements ``generate`` alone and is served one request at
a time, each answered inside :meth:`Batch.join`.

What a request may ask of a family is declared as class attributes (languages, caption lengths,
options), not discovered; core/admission.py checks a request against them.
"""

from __future__ import annotations

import abc
import inspect
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from vlm_service.backends.runtime import ModelSpec, Runtime
from vlm_service.images.cache import ImageCache
from vlm_service.types import (
    CaptionLength,
    FinishReason,
    GenerationRequest,
    ImageBound,
    ImageDetail,
    ImageTiling,
    Malformed,
    Region,
    Task,
)


class RegionParser(Protocol):
    """Turns a grounding answer's text, as it streams, into regions (a family whose model writes its
    regions as text: Qwen2-VL's boxes). Each call returns what the text so far completes."""

    def push(self, text: str) -> list[Region | Malformed]: ...

    def finish(self) -> list[Malformed]:
        """What is left when the answer ends: text that began a region and never became one."""
        ...


@dataclass(frozen=True)
class Outcome:
    """How a generation ended, as the backend saw it (stop strings and cancels are the engine's)."""

    prompt_tokens: int
    completion_tokens: int
    reason: FinishReason  # STOP (end-of-sequence) or LENGTH (max_new_tokens)


class TextSink(Protocol):
    """Where a backend sends what the model writes, and asks whether to go on."""

    def add_text(self, piece: str) -> None: ...

    def add_region(self, region: Region) -> None:
        """One object found, for a family whose grounding API returns regions, not text (Moondream)."""
        ...

    def should_stop(self) -> bool: ...

    def waiting(self) -> bool:
        """A sign of life while the row waits for something other than its model (a lock that another
        model's thread holds), so the watchdog does not take the wait for a stuck model; returns whether
        to stop waiting (its RPC ended). Not a stop check: no step is counted."""
        ...


class Batch(abc.ABC):
    """The rows one model decodes together. Made by :meth:`Backend.new_batch`, driven by the model's
    scheduler, in its one thread only.

    Each row writes to its request's :class:`TextSink` and asks it, at each decode step, whether to
    go on; the scheduler hands each request's job as its sink, and gets the same sinks back.
    """

    #: The most rows decoded together.
    max_rows: int = 1

    @abc.abstractmethod
    def __len__(self) -> int:
        """Rows being decoded."""

    @property
    def room(self) -> int:
        """Requests that may join now."""
        return self.max_rows - len(self) - self.joining

    @abc.abstractmethod
    def join(self, request: GenerationRequest, out: TextSink) -> Outcome | None:
        """Start ``request``: process its prompt and write its first output. Returns its outcome
        if it has already ended (it is then not in the batch), else None. If it raises, the request is
        not in the batch and the other rows are untouched."""

    @property
    def joining(self) -> int:
        """Requests that joined but whose prompt is still to be processed (see :meth:`prefill_step`); 0
        for a batch whose :meth:`join` processes the whole prompt."""
        return 0

    def prefill_step(self) -> list[tuple[TextSink, Outcome | None, bool]]:
        """Prefill work for joining requests (the next chunk of the oldest one's prompt, or several
        requests' prompts at once). Returns, for each request it worked on: its sink, its outcome if it
        has already ended (it is then not in the batch), and whether its prompt is done (it then decodes
        with the others, its first output written). If it raises, the requests it worked on are no
        longer in the batch (the others are untouched); :attr:`next_prefill` named them before the call."""
        raise NotImplementedError(f"{type(self).__name__} joins requests whole")

    @property
    def next_prefill(self) -> list[TextSink]:
        """The sinks of the requests the next :meth:`prefill_step` works on (empty: none is joining)."""
        return []

    @abc.abstractmethod
    def decode_step(self) -> list[tuple[TextSink, Outcome]]:
        """One decode step for every row; returns the rows that ended (and left the batch), with how."""

    @abc.abstractmethod
    def abort(self, joining: bool = True) -> list[TextSink]:
        """Drop every row (after a failed step, no row is in a known state), and with ``joining`` every
        request still joining too (whose prefills the failed step did not touch); returns their sinks."""


class WholeAnswers(Batch):
    """The batch of a family that implements only ``generate``: one request at a time, answered whole
    inside :meth:`join` (``generate`` itself checks ``out.should_stop()`` between its decode steps)."""

    def __init__(self, backend: Backend):
        self._backend = backend

    def __len__(self) -> int:
        return 0

    def join(self, request: GenerationRequest, out: TextSink) -> Outcome:
        return self._backend.generate(request, out)

    def decode_step(self) -> list[tuple[TextSink, Outcome]]:
        return []

    def abort(self, joining: bool = True) -> list[TextSink]:
        return []


def run_alone(batch: Batch, request: GenerationRequest, out: TextSink) -> Outcome:
    """Decode ``request`` alone in ``batch`` (an empty one) until it ends."""
    try:
        outcome = batch.join(request, out)
        while outcome is None and batch.joining:
            ((_, outcome, _),) = batch.prefill_step()
        while outcome is None:
            for _, outcome in batch.decode_step():  # noqa: B007 (the one row's outcome is what ends the loop)
                pass
    except BaseException:
        batch.abort()
        raise
    return outcome


class Backend(abc.ABC):
    """One model family. Subclasses set the class attributes and implement ``load``, and ``new_batch``
    or ``generate`` (see the module's docstring)."""

    #: Registry name of the family ("smolvlm", ...).
    family: ClassVar[str]
    #: Caption lengths the family supports.
    caption_lengths: ClassVar[tuple[CaptionLength, ...]] = tuple(CaptionLength)
    #: Response languages the family supports (BCP-47 codes); the first is the default.
    languages: ClassVar[tuple[str, ...]] = ("en",)
    #: GenerationOptions fields the family honours; a request setting any other is INVALID_ARGUMENT.
    supported_options: ClassVar[frozenset[str]] = frozenset(
        {"max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "stop", "seed"}
    )
    #: Role words the model may write before its answer; removed once from the start of the text.
    role_prefixes: ClassVar[tuple[str, ...]] = ()
    #: The grounding tasks the family answers (Task.DETECT, Task.POINT); others are FAILED_PRECONDITION.
    grounding: ClassVar[frozenset[Task]] = frozenset()
    #: The most pictures one Query may carry (the server's --max-images-per-query may lower it).
    max_images: ClassVar[int] = 1
    #: Default token budget per caption length, used when a request leaves max_new_tokens at 0.
    caption_budgets: ClassVar[dict[CaptionLength, int]] = {
        CaptionLength.SHORT: 32,
        CaptionLength.NORMAL: 96,
        CaptionLength.LONG: 256,
    }

    def __init__(self, spec: ModelSpec, runtime: Runtime):
        self.spec = spec
        #: How this model's prefills are cut and paced (one piece until ``load`` knows the model's size).
        self.prefill = runtime.prefill_policy(0, None)
        self.runtime = runtime
        #: What this model already computed for recent images (by content hash); see image_cache.
        self.images = ImageCache(runtime.image_cache_size, runtime.image_cache_budget())

    @abc.abstractmethod
    def load(self) -> None:
        """Load weights and processors. Called once, off the event loop."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not inspect.isabstract(cls) and cls.new_batch is Backend.new_batch and cls.generate is Backend.generate:
            raise TypeError(f"{cls.__name__} must implement new_batch() or generate()")

    def new_batch(self, max_rows: int) -> Batch:
        """The batch this model's scheduler drives, of at most ``max_rows`` rows (a family that cannot
        decode requests together ignores it). Default: one request at a time, through ``generate``."""
        return WholeAnswers(self)

    def generate(self, request: GenerationRequest, out: TextSink) -> Outcome:
        """Answer ``request`` alone, streaming raw text into ``out`` as the model writes it and checking
        ``out.should_stop()`` between decode steps. Default: a batch of one row."""
        return run_alone(self.new_batch(1), request, out)

    def region_parser(self, request: GenerationRequest) -> RegionParser | None:
        """For a grounding request, what turns the model's text into regions; None: the family sends
        regions itself (``TextSink.add_region``)."""
        return None

    def grounding_budget(self, max_objects: int) -> int:
        """Tokens a grounding answer of up to ``max_objects`` regions may take (its max_new_tokens)."""
        return 32 + 24 * max_objects

    def image_bound(self, detail: ImageDetail) -> ImageBound | None:
        """The largest picture this model uses at ``detail`` (its processor shrinks a bigger one anyway);
        a picture is reduced to it as soon as it is decoded. Default: None, the picture as sent."""
        return None

    def image_tilings(self) -> dict[ImageDetail, ImageTiling]:
        """The image detail levels this model offers (AUTO first), with what each does to a picture;
        a request asking for another is refused. Default: AUTO only, the family's own processing."""
        return {ImageDetail.AUTO: ImageTiling(ImageDetail.AUTO, f"{self.family}'s own image processing")}

    #: The loaded torch model (set by ``load``).
    model: Any

    @property
    def context_length(self) -> int:
        """The model's context length in tokens."""
        return 0

    @property
    def device(self) -> str:
        return str(self.model.device)

    @property
    def dtype(self) -> str:
        return str(self.model.dtype).removeprefix("torch.")


def drained(steps: Generator[None, None, Any]) -> Any:
    """What a chunked computation (a generator that yields between chunks) returns, all its chunks run
    at once."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value
