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
    image: ImageLike, question: str, model: str, language: str, detail: str | None = None, **opts
) -> pb.QueryRequest:
    return pb.QueryRequest(
        model=model,
        image=pb.Image(data=image_bytes(image)),
        question=question,
        options=options(**opts),
        response_language=language,
        detail=image_detail(detail),
    )


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
    )


def request_id(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "x-request-id":
            return value
    return None
