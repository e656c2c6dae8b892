"""Building requests and reading responses: shared by the sync and asyncio clients."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vlm.v1 import vlm_service_pb2 as pb

from .images import ImageLike, image_bytes

CAPTION_LENGTHS = {
    None: pb.CAPTION_LENGTH_UNSPECIFIED,
    "": pb.CAPTION_LENGTH_UNSPECIFIED,
    "short": pb.CAPTION_LENGTH_SHORT,
    "normal": pb.CAPTION_LENGTH_NORMAL,
    "long": pb.CAPTION_LENGTH_LONG,
}
IMAGE_DETAILS = {
    None: pb.IMAGE_DETAIL_UNSPECIFIED,
    "": pb.IMAGE_DETAIL_UNSPECIFIED,
    "auto": pb.IMAGE_DETAIL_AUTO,
    "low": pb.IMAGE_DETAIL_LOW,
    "high": pb.IMAGE_DETAIL_HIGH,
}
FINISH_REASONS = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_STOP_SEQUENCE: "stop_sequence",
    pb.FINISH_REASON_INTERRUPTED: "interrupted",
    pb.FINISH_REASON_MAX_OBJECTS: "max_objects",
}
WATCH_POLICIES = {
    None: pb.WATCH_POLICY_UNSPECIFIED,
    "": pb.WATCH_POLICY_UNSPECIFIED,
    "latest": pb.WATCH_POLICY_LATEST,
    "interrupt": pb.WATCH_POLICY_INTERRUPT,
}


@dataclass(frozen=True)
class Usage:
    """Token counts and server-side timings of one request."""

    prompt_tokens: int
    completion_tokens: int
    queue_time_ms: float
    time_to_first_token_ms: float
    total_time_ms: float


@dataclass(frozen=True)
class ImageTiling:
    """What one image detail level ("auto", "low", "high") does to a picture on one model (0: not known)."""

    detail: str
    description: str
    max_views: int
    max_image_tokens: int


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str
    source: str
    ready: bool
    is_default: bool
    caption_lengths: tuple[str, ...]
    response_languages: tuple[str, ...]
    context_length: int
    max_new_tokens_limit: int
    device: str
    dtype: str
    image_details: tuple[ImageTiling, ...] = ()
    detects: bool = False
    points: bool = False
    max_images: int = 1


@dataclass(frozen=True)
class Box:
    """A box around one object found, normalized to the picture (0..1, origin top left)."""

    x_min: float
    y_min: float
    x_max: float
    y_max: float

    def pixels(self, width: int, height: int) -> tuple[int, int, int, int]:
        """The box in pixels of a ``width`` x ``height`` picture: (left, top, right, bottom)."""
        return (
            round(self.x_min * width),
            round(self.y_min * height),
            round(self.x_max * width),
            round(self.y_max * height),
        )


@dataclass(frozen=True)
class Point:
    """A point on one object found, normalized to the picture (0..1, origin top left)."""

    x: float
    y: float

    def pixels(self, width: int, height: int) -> tuple[int, int]:
        return round(self.x * width), round(self.y * height)


@dataclass(frozen=True)
class Malformed:
    """What the model wrote where an object should have been, and why it is not one."""

    text: str
    reason: str


def options(
    max_new_tokens: int = 0,
    temperature: float = 0.0,
    top_p: float = 0.0,
    top_k: int = 0,
    repetition_penalty: float = 0.0,
    stop: Sequence[str] = (),
    seed: int | None = None,
) -> pb.GenerationOptions:
    if isinstance(stop, str):
        stop = [stop]
    message = pb.GenerationOptions(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        stop=list(stop),
    )
    if seed is not None:
        message.seed = seed
    return message


def image_detail(detail: str | None) -> int:
    if detail not in IMAGE_DETAILS:
        raise ValueError(f"detail must be one of auto, low, high; got {detail!r}")
    return IMAGE_DETAILS[detail]


def caption_request(
    image: ImageLike, model: str, length: str | None, language: str, detail: str | None = None, **opts
) -> pb.CaptionRequest:
    if length not in CAPTION_LENGTHS:
        raise ValueError(f"length must be one of short, normal, long; got {length!r}")
    return pb.CaptionRequest(
        model=model,
        image=pb.Image(data=image_bytes(image)),
        length=CAPTION_LENGTHS[length],
        options=options(**opts),
        response_language=language,
        detail=image_detail(detail),
    )


def query_request(
    image: ImageLike | Sequence[ImageLike], question: str, model: str, language: str, detail: str | None = None, **opts
) -> pb.QueryRequest:
    """One picture goes in ``image`` (what every server version reads), several in ``images``."""
    several = isinstance(image, list | tuple)
    return pb.QueryRequest(
        model=model,
        image=None if several else pb.Image(data=image_bytes(image)),
        images=[pb.Image(data=image_bytes(each)) for each in image] if several else [],
        question=question,
        options=options(**opts),
        response_language=language,
        detail=image_detail(detail),
    )


def grounding_request(
    message: type[pb.DetectRequest] | type[pb.PointRequest],
    image: ImageLike,
    target: str,
    model: str,
    max_objects: int,
    detail: str | None,
) -> pb.DetectRequest | pb.PointRequest:
    """A Detect or a Point request (``message`` says which: they have the same fields)."""
    return message(
        model=model,
        image=pb.Image(data=image_bytes(image)),
        object=target,
        max_objects=max_objects,
        detail=image_detail(detail),
    )


def region_from(message: pb.DetectResponse | pb.PointResponse) -> Box | Point | None:
    """The region a Detect or Point message carries (None: its last message, or a malformed output)."""
    if isinstance(message, pb.DetectResponse) and message.HasField("box"):
        b = message.box
        return Box(b.x_min, b.y_min, b.x_max, b.y_max)
    if isinstance(message, pb.PointResponse) and message.HasField("point"):
        return Point(message.point.x, message.point.y)
    return None


def watch_config(
    question: str,
    model: str,
    length: str | None,
    language: str,
    policy: str | None,
    detail: str | None = None,
    **opts,
) -> pb.WatchRequest:
    """The first message of a Watch stream."""
    if length not in CAPTION_LENGTHS:
        raise ValueError(f"length must be one of short, normal, long; got {length!r}")
    if policy not in WATCH_POLICIES:
        raise ValueError(f"policy must be latest or interrupt; got {policy!r}")
    config = pb.WatchConfig(
        model=model,
        question=question,
        length=CAPTION_LENGTHS[length],
        options=options(**opts),
        response_language=language,
        policy=WATCH_POLICIES[policy],
        detail=image_detail(detail),
    )
    return pb.WatchRequest(config=config)


def watch_frame(item, index: int) -> pb.WatchRequest:
    """A frame message from an image (its id: ``index``) or a ``(frame_id, image)`` pair."""
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], int):
        frame_id, image = item
    else:
        frame_id, image = index, item
    return pb.WatchRequest(frame=pb.Frame(frame_id=frame_id, image=pb.Image(data=image_bytes(image))))


def usage_from(message) -> Usage:
    u = message.usage
    return Usage(u.prompt_tokens, u.completion_tokens, u.queue_time_ms, u.time_to_first_token_ms, u.total_time_ms)


def model_info_from(message: pb.ModelInfo) -> ModelInfo:
    lengths = {v: k for k, v in CAPTION_LENGTHS.items() if k}
    details = {v: k for k, v in IMAGE_DETAILS.items() if k}
    return ModelInfo(
        name=message.name,
        family=message.family,
        source=message.source,
        ready=message.ready,
        is_default=message.is_default,
        caption_lengths=tuple(lengths[v] for v in message.caption_lengths if v in lengths),
        response_languages=tuple(message.response_languages),
        context_length=message.context_length,
        max_new_tokens_limit=message.max_new_tokens_limit,
        device=message.device,
        dtype=message.dtype,
        image_details=tuple(
            ImageTiling(details[t.detail], t.description, t.max_views, t.max_image_tokens)
            for t in message.image_details
            if t.detail in details
        ),
        detects=message.detects,
        points=message.points,
        max_images=message.max_images,
    )


def request_id(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "x-request-id":
            return value
    return None
