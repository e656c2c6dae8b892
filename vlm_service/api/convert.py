"""The protobuf edge: validate requests into domain objects, and domain events into responses.

Nothing past this module sees a protobuf message. Every rejection is an :class:`InvalidInput` naming
the request field (``options.top_p``) and what is wrong with it. The checks here are of values alone
(ranges, lengths, counts, enum values), the same for every model; what a model supports (languages,
caption lengths, options) is checked once, by core/admission.py.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator

from vlm.v1 import vlm_service_pb2 as pb
from vlm_service.api.status import to_rpc_status
from vlm_service.api.watch import Frame, FrameAnswered, FrameRejected, FrameText, WatchConfig, WatchEvent, WatchPolicy
from vlm_service.config import Settings
from vlm_service.errors import InvalidInput
from vlm_service.observability.access import new_request_id
from vlm_service.types import (
    CaptionLength,
    Finished,
    FinishReason,
    GenerationRequest,
    ImageDetail,
    Malformed,
    ModelCard,
    Region,
    SamplingParams,
    Task,
    TextDelta,
)


def _to_pb(from_pb: dict, unspecified: int) -> dict:
    """The wire value of each domain value: ``from_pb`` reversed, leaving out ``UNSPECIFIED`` (read as a
    default, never written)."""
    return {domain: wire for wire, domain in from_pb.items() if wire != unspecified}


_LENGTHS = {
    pb.CAPTION_LENGTH_UNSPECIFIED: CaptionLength.NORMAL,
    pb.CAPTION_LENGTH_SHORT: CaptionLength.SHORT,
    pb.CAPTION_LENGTH_NORMAL: CaptionLength.NORMAL,
    pb.CAPTION_LENGTH_LONG: CaptionLength.LONG,
}
_LENGTHS_TO_PB = _to_pb(_LENGTHS, pb.CAPTION_LENGTH_UNSPECIFIED)
_DETAILS = {
    pb.IMAGE_DETAIL_UNSPECIFIED: ImageDetail.AUTO,
    pb.IMAGE_DETAIL_AUTO: ImageDetail.AUTO,
    pb.IMAGE_DETAIL_LOW: ImageDetail.LOW,
    pb.IMAGE_DETAIL_HIGH: ImageDetail.HIGH,
}
_DETAILS_TO_PB = _to_pb(_DETAILS, pb.IMAGE_DETAIL_UNSPECIFIED)
_FINISH_TO_PB = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.INTERRUPTED: pb.FINISH_REASON_INTERRUPTED,
    FinishReason.MAX_OBJECTS: pb.FINISH_REASON_MAX_OBJECTS,
}
_POLICIES = {
    pb.WATCH_POLICY_UNSPECIFIED: WatchPolicy.LATEST,
    pb.WATCH_POLICY_LATEST: WatchPolicy.LATEST,
    pb.WATCH_POLICY_INTERRUPT: WatchPolicy.INTERRUPT,
}


def sampling_params(options: pb.GenerationOptions, settings: Settings) -> SamplingParams:
    """Validate GenerationOptions; 0/unset fields take the model's defaults (max_new_tokens 0 stays 0)."""
    limit = settings.max_new_tokens_limit
    if options.max_new_tokens > limit:
        raise InvalidInput("options.max_new_tokens", f"{options.max_new_tokens} exceeds the server's limit of {limit}")
    temperature = options.temperature
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidInput("options.temperature", f"must be a finite number >= 0 (0 is greedy), got {temperature}")
    top_p = options.top_p or 1.0
    if not math.isfinite(top_p) or not 0.0 < top_p <= 1.0:
        raise InvalidInput("options.top_p", f"must be in (0, 1], got {options.top_p}")
    repetition_penalty = options.repetition_penalty or 1.0
    if not math.isfinite(repetition_penalty) or repetition_penalty <= 0:
        raise InvalidInput(
            "options.repetition_penalty", f"must be a finite number > 0, got {options.repetition_penalty}"
        )
    if len(options.stop) > settings.max_stop_sequences:
        raise InvalidInput(
            "options.stop", f"{len(options.stop)} stop strings; the limit is {settings.max_stop_sequences}"
        )
    for i, stop in enumerate(options.stop):
        if not stop:
            raise InvalidInput(f"options.stop[{i}]", "stop strings must not be empty")
        if len(stop) > settings.max_stop_chars:
            raise InvalidInput(f"options.stop[{i}]", f"{len(stop)} characters; the limit is {settings.max_stop_chars}")
    return SamplingParams(
        max_new_tokens=options.max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=options.top_k,
        repetition_penalty=repetition_penalty,
        stop=tuple(options.stop),
        seed=options.seed if options.HasField("seed") else None,
    )


def image_data(message, settings: Settings) -> list[bytes]:
    """The encoded bytes of the request's pictures (decoded later, off the event loop: see
    images/decode.py): ``image``, or a Query's ``images``."""
    several = list(message.images) if isinstance(message, pb.QueryRequest) else []
    if several:
        if message.HasField("image"):
            raise InvalidInput("images", "set image or images, not both")
        if len(several) > settings.max_images_per_query:
            raise InvalidInput(
                "images", f"{len(several)} pictures; the server's limit is {settings.max_images_per_query} per Query"
            )
        return [picture.data for picture in several]
    if not message.HasField("image"):
        raise InvalidInput("image", "an image is required")
    return [message.image.data]


def _language(code: str) -> str:
    return code.strip().lower() or "en"


def caption_request(
    message: pb.CaptionRequest | pb.WatchConfig, settings: Settings, request_id: str = ""
) -> GenerationRequest:
    """The request less its image (``image`` None): the servicer decodes it off the event loop."""
    if message.length not in _LENGTHS:
        raise InvalidInput("length", f"unknown caption length {message.length}")
    return GenerationRequest(
        request_id=request_id or new_request_id(),
        model=message.model,
        task=Task.CAPTION,
        image=None,
        params=sampling_params(message.options, settings),
        length=_LENGTHS[message.length],
        language=_language(message.response_language),
        detail=_detail(message.detail),
    )


def query_request(
    message: pb.QueryRequest | pb.WatchConfig, settings: Settings, request_id: str = ""
) -> GenerationRequest:
    """The request less its image (``image`` None): the servicer decodes it off the event loop."""
    question = message.question.strip()
    if not question:
        raise InvalidInput("question", "the question is empty")
    if len(question) > settings.max_question_chars:
        raise InvalidInput("question", f"{len(question)} characters; the limit is {settings.max_question_chars}")
    return GenerationRequest(
        request_id=request_id or new_request_id(),
        model=message.model,
        task=Task.QUERY,
        image=None,
        params=sampling_params(message.options, settings),
        question=question,
        language=_language(message.response_language),
        detail=_detail(message.detail),
    )


def grounding_request(
    message: pb.DetectRequest | pb.PointRequest, settings: Settings, request_id: str, task: Task
) -> GenerationRequest:
    """A Detect or Point request less its image (``image`` None). Greedy: a region is the model's best
    guess, not a sample."""
    target = message.object.strip()
    if not target:
        raise InvalidInput("object", 'say what to find ("red circle", "face"); it is empty')
    if len(target) > settings.max_object_chars:
        raise InvalidInput("object", f"{len(target)} characters; the limit is {settings.max_object_chars}")
    if "<|" in target or "\n" in target:
        raise InvalidInput("object", "must be one line of plain words, without the model's control tokens")
    if message.max_objects > settings.max_objects:
        raise InvalidInput("max_objects", f"{message.max_objects} exceeds the server's limit of {settings.max_objects}")
    return GenerationRequest(
        request_id=request_id or new_request_id(),
        model=message.model,
        task=task,
        image=None,
        params=SamplingParams(max_new_tokens=0),
        detail=_detail(message.detail),
        target=target,
        max_objects=message.max_objects,
    )


def detect_request(message: pb.DetectRequest, settings: Settings, request_id: str = "") -> GenerationRequest:
    return grounding_request(message, settings, request_id, Task.DETECT)


def point_request(message: pb.PointRequest, settings: Settings, request_id: str = "") -> GenerationRequest:
    return grounding_request(message, settings, request_id, Task.POINT)


def _malformed(event: Malformed) -> pb.MalformedOutput:
    return pb.MalformedOutput(text=event.text, reason=event.reason)


def detect_response(event: Region | Malformed | Finished) -> pb.DetectResponse:
    if isinstance(event, Region):
        x_min, y_min, x_max, y_max = event.box
        return pb.DetectResponse(box=pb.BoundingBox(x_min=x_min, y_min=y_min, x_max=x_max, y_max=y_max))
    if isinstance(event, Malformed):
        return pb.DetectResponse(malformed=_malformed(event))
    return pb.DetectResponse(**response_fields(event))


def point_response(event: Region | Malformed | Finished) -> pb.PointResponse:
    if isinstance(event, Region):
        x, y = event.point
        return pb.PointResponse(point=pb.NormalizedPoint(x=x, y=y))
    if isinstance(event, Malformed):
        return pb.PointResponse(malformed=_malformed(event))
    return pb.PointResponse(**response_fields(event))


def caption_response(event: TextDelta | Finished) -> pb.CaptionResponse:
    return pb.CaptionResponse(**response_fields(event))


def query_response(event: TextDelta | Finished) -> pb.QueryResponse:
    return pb.QueryResponse(**response_fields(event))


def _detail(value: int) -> ImageDetail:
    if value not in _DETAILS:
        raise InvalidInput("detail", f"unknown image detail {value}")
    return _DETAILS[value]


def watch_config(message: pb.WatchRequest, settings: Settings, request_id: str = "") -> WatchConfig:
    """The first message of a Watch stream: its config, validated as a Query (a question) or a Caption
    (no question) would be; fields are named from the message (``config.options.top_p``)."""
    kind = message.WhichOneof("kind")
    if kind != "config":
        got = "a frame" if kind == "frame" else "neither a config nor a frame"
        raise InvalidInput("config", f"the first message of a Watch stream must be its config; it carried {got}")
    config = message.config
    if config.policy not in _POLICIES:
        raise InvalidInput("config.policy", f"unknown watch policy {config.policy}")
    try:
        if config.question.strip():
            if config.length != pb.CAPTION_LENGTH_UNSPECIFIED:
                raise InvalidInput("length", "applies to captions (an empty question) only")
            request = query_request(config, settings, request_id)
        else:
            request = caption_request(config, settings, request_id)
    except InvalidInput as exc:
        raise exc.under("config") from None
    return WatchConfig(request, _POLICIES[config.policy])


async def watch_frames(messages: AsyncIterator[pb.WatchRequest]) -> AsyncIterator[Frame]:
    """The frames of a Watch stream after its config; a message that is not a frame ends the stream
    (InvalidInput)."""
    async for message in messages:
        arrival = time.monotonic()
        kind = message.WhichOneof("kind")
        if kind == "config":
            raise InvalidInput("config", "only the first message of a Watch stream may be a config")
        if kind != "frame":
            raise InvalidInput("frame", "a message of a Watch stream carried neither a config nor a frame")
        frame = message.frame
        yield Frame(frame.frame_id, frame.image.data if frame.HasField("image") else None, arrival)


def watch_response(event: WatchEvent) -> pb.WatchResponse:
    if isinstance(event, FrameText):
        return pb.WatchResponse(frame_id=event.frame_id, text=event.text)
    if isinstance(event, FrameAnswered):
        return pb.WatchResponse(
            frame_id=event.frame_id, frames_skipped=event.frames_skipped, **response_fields(event.finished)
        )
    assert isinstance(event, FrameRejected)
    return pb.WatchResponse(
        frame_id=event.frame_id, frames_skipped=event.frames_skipped, error=to_rpc_status(event.error)
    )


def response_fields(event: TextDelta | Finished) -> dict:
    """Keyword arguments for CaptionResponse / QueryResponse (they share their fields)."""
    if isinstance(event, TextDelta):
        return {"text": event.text}
    usage = event.usage
    return {
        "finish_reason": _FINISH_TO_PB[event.reason],
        "usage": pb.Usage(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            queue_time_ms=usage.queue_time_ms,
            time_to_first_token_ms=usage.time_to_first_token_ms,
            total_time_ms=usage.total_time_ms,
        ),
    }


def model_info(card: ModelCard) -> pb.ModelInfo:
    return pb.ModelInfo(
        name=card.name,
        family=card.family,
        source=card.source,
        ready=card.ready,
        is_default=card.is_default,
        caption_lengths=[_LENGTHS_TO_PB[length] for length in card.caption_lengths],
        response_languages=list(card.languages),
        context_length=card.context_length,
        max_new_tokens_limit=card.max_new_tokens_limit,
        device=card.device,
        dtype=card.dtype,
        image_details=[
            pb.ImageTiling(
                detail=_DETAILS_TO_PB[tiling.detail],
                description=tiling.description,
                max_views=tiling.max_views,
                max_image_tokens=tiling.max_image_tokens,
            )
            for tiling in card.image_details
        ],
        detects=card.detects,
        points=card.points,
        max_images=card.max_images,
    )
