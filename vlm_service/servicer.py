"""The gRPC servicer: validate -> domain request -> engine -> protobuf. Nothing else lives here."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator

import grpc

from vlm.v1 import vlm_service_pb2 as pb
from vlm.v1 import vlm_service_pb2_grpc as pb_grpc

from . import convert
from .config import Settings
from .decoding import ImageDecoder
from .engine import Engine
from .errors import ServiceError
from .interceptors import status_code
from .types import GenerationRequest

logger = logging.getLogger(__name__)

_NO_DEADLINE = 1e8  # seconds; grpc reports a huge remaining time when the RPC has no deadline


class VisionLanguageServicer(pb_grpc.VisionLanguageServiceServicer):
    def __init__(self, engine: Engine, settings: Settings, decoder: ImageDecoder | None = None):
        self.engine = engine
        self.settings = settings
        self.decoder = decoder or ImageDecoder(
            workers=settings.max_image_decodes,
            max_waiting=settings.max_streams,
            max_bytes=settings.max_image_bytes,
            max_pixels=settings.max_image_pixels,
        )

    async def Caption(
        self, request: pb.CaptionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.CaptionResponse]:
        with self._counted("Caption", context):
            domain = convert.caption_request(request, self.settings)
            domain = await self._with_image(domain, convert.image_data(request))
            async for response in self._stream(domain, pb.CaptionResponse, context):
                yield response

    async def Query(
        self, request: pb.QueryRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.QueryResponse]:
        with self._counted("Query", context):
            domain = convert.query_request(request, self.settings)
            domain = await self._with_image(domain, convert.image_data(request))
            async for response in self._stream(domain, pb.QueryResponse, context):
                yield response

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[convert.model_info(card) for card in self.engine.cards()])

    @contextlib.contextmanager
    def _counted(self, method: str, context) -> Iterator[None]:
        """Count the RPC by the status it ends with (the metrics' requests by final status)."""
        code = "OK"
        try:
            yield
        except ServiceError as exc:
            code = status_code(exc).name
            raise
        except (asyncio.CancelledError, GeneratorExit):
            remaining = context.time_remaining()
            code = "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
            raise
        except Exception:
            code = "INTERNAL"
            raise
        finally:
            self.engine.metrics.requests.labels(method, code).inc()

    async def _with_image(self, request: GenerationRequest, data: bytes) -> GenerationRequest:
        image, digest = await self.decoder.decode(data)
        return dataclasses.replace(request, image=image, image_digest=digest)

    async def _stream(self, request: GenerationRequest, message: Callable, context) -> AsyncIterator:
        remaining = context.time_remaining()
        if remaining is not None and remaining < _NO_DEADLINE:
            request = dataclasses.replace(request, deadline=time.monotonic() + remaining)
        job = self.engine.submit(request)
        logger.debug("request %s queued on %s", request.request_id, request.model or self.engine.default_model)
        try:
            await context.send_initial_metadata((("x-request-id", request.request_id),))
            async for event in job.events():
                yield message(**convert.response_fields(event))
        finally:
            # The RPC ended (finished, cancelled, deadline, disconnect): stop the generation.
            self.engine.release(job)
