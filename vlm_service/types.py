"""Domain types: what the engine and the backends speak. No protobuf here (it stays at the edge)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from PIL import Image


class Task(enum.Enum):
    CAPTION = "caption"
    QUERY = "query"
    DETECT = "detect"  # boxes around every instance of ``GenerationRequest.target``
    POINT = "point"  # a point on every instance of ``GenerationRequest.target``

    @property
    def grounding(self) -> bool:
        """Whether the answer is regions of the picture (:class:`Region`), not text."""
        return self in (Task.DETECT, Task.POINT)


class CaptionLength(enum.Enum):
    SHORT = "short"
    NORMAL = "normal"
    LONG = "long"


class ImageDetail(enum.Enum):
    """How much of the picture the model looks at (detail traded for latency)."""

    AUTO = "auto"  # what the model's processor does by default
    LOW = "low"  # one view of the whole picture at the model's base resolution
    HIGH = "high"  # the model's full tiling


@dataclass(frozen=True)
class ImageTiling:
    """What one detail level does to a picture on one model (0: not known)."""

    detail: ImageDetail
    description: str
    max_views: int = 0
    max_image_tokens: int = 0


@dataclass(frozen=True)
class ImageBound:
    """The largest picture a model uses at one detail level: its processor shrinks anything bigger to
    within it anyway, so a picture is reduced to it as soon as it is decoded (images/decode.py) and nothing
    downstream touches more pixels. None means no bound of that kind."""

    longest_edge: int | None = None  # pixels along the longer side
    pixels: int | None = None  # width x height

    def fit(self, width: int, height: int) -> tuple[int, int]:
        """``(width, height)`` scaled down, aspect ratio kept, to within the bound (unchanged if it is)."""
        scale = 1.0
        if self.longest_edge:
            scale = min(scale, self.longest_edge / max(width, height))
        if self.pixels:
            scale = min(scale, (self.pixels / (width * height)) ** 0.5)
        if scale >= 1.0:
            return width, height
        return max(1, int(width * scale)), max(1, int(height * scale))


class FinishReason(enum.Enum):
    STOP = "stop"  # the model wrote its end-of-sequence token
    LENGTH = "length"  # max_new_tokens reached
    STOP_SEQUENCE = "stop_sequence"  # a requested stop string appeared
    INTERRUPTED = "interrupted"  # something newer replaced it (a Watch stream's newer frame): Job.interrupt
    MAX_OBJECTS = "max_objects"  # DETECT / POINT: max_objects regions were found


@dataclass(frozen=True)
class SamplingParams:
    """Validated decoding options. ``temperature == 0`` is greedy."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def options_set(self) -> set[str]:
        """Names of the options that differ from their defaults."""
        defaults = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0, "stop": (), "seed": None}
        chosen = {name for name, default in defaults.items() if getattr(self, name) != default}
        return chosen | ({"max_new_tokens"} if self.max_new_tokens else set())


@dataclass(frozen=True)
class GenerationRequest:
    """One validated request, ready for a backend."""

    request_id: str
    model: str
    task: Task
    image: Image.Image
    params: SamplingParams
    question: str = ""
    length: CaptionLength = CaptionLength.NORMAL
    language: str = "en"
    arrival: float = field(default_factory=time.monotonic)
    deadline: float | None = None  # time.monotonic() by which the RPC ends, if it has a deadline
    image_digest: str = ""  # hash of the image's bytes; empty: not cached
    detail: ImageDetail = ImageDetail.AUTO
    target: str = ""  # DETECT / POINT: the phrase naming what to find ("red circle")
    max_objects: int = 0  # DETECT / POINT: the most regions to return

    more_images: tuple[Image.Image, ...] = ()  # a Query about several pictures: those after ``image``
    more_digests: tuple[str, ...] = ()  # their bytes' hashes, in the same order

    @property
    def image_key(self) -> str:
        """The image cache's key: the image's bytes and the detail it is looked at in (empty: not cached)."""
        return self._cache_key(self.image_digest)

    def _cache_key(self, digest: str) -> str:
        return f"{digest}/{self.detail.value}" if digest else ""

    @property
    def pictures(self) -> tuple[Image.Image, ...]:
        """Every picture of the request, in order (one, unless a Query carries several)."""
        return (self.image, *self.more_images)

    @property
    def picture_keys(self) -> tuple[str, ...]:
        """Each picture's image cache key (empty: not cached), in the order of :attr:`pictures`."""
        return tuple(self._cache_key(digest) for digest in (self.image_digest, *self.more_digests))


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    queue_time_ms: float
    time_to_first_token_ms: float
    total_time_ms: float


@dataclass(frozen=True)
class TextDelta:
    """New text since the previous delta; never empty."""

    text: str


@dataclass(frozen=True)
class Region:
    """One object found (Detect: ``box``; Point: ``point``), in coordinates normalized to the picture
    as sent (0..1, origin top left, after EXIF rotation)."""

    box: tuple[float, float, float, float] | None = None  # x_min, y_min, x_max, y_max
    point: tuple[float, float] | None = None  # x, y


@dataclass(frozen=True)
class Malformed:
    """Output of the model that should have been a region and is not one (reported, never fatal)."""

    text: str
    reason: str


@dataclass(frozen=True)
class Finished:
    """The last event of a stream."""

    reason: FinishReason
    usage: Usage


@dataclass(frozen=True)
class ModelCard:
    """What ListModels reports about one served model."""

    name: str
    family: str
    source: str
    ready: bool
    is_default: bool
    caption_lengths: tuple[CaptionLength, ...]
    languages: tuple[str, ...]
    context_length: int
    max_new_tokens_limit: int
    device: str
    dtype: str
    image_details: tuple[ImageTiling, ...] = ()
    detects: bool = False
    points: bool = False
    max_images: int = 1
