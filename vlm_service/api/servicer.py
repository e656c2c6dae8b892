"""The gRPC servicer: the RPCs' handlers, and nothing else.

A Caption or Query goes down once: :mod:`convert` checks its values and makes the domain request, its
image is decoded off the event loop (images/decode.py), :meth:`Engine.submit` admits it and queues it
on its model's scheduler, and the job's events come back up as protobuf messages. A Watch stream's
config is checked by :mod:`convert` too; its frames go to a :class:`~vlm_service.api.watch.WatchSession`,
which decodes each one and submits the newest through the same :meth:`Engine.submit`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator

import grpc
from opentelemetry import trace

from vlm.v1 import vlm_service_pb2 as pb
from vlm.v1 import vlm_service_pb2_grpc as pb_grpc
from vlm_service.api import convert
from vlm_service.api.status import status_code
from vlm_service.api.watch import WatchSession
from vlm_service.config import Settings
from vlm_service.core.engine import Engine
from vlm_service.errors import InvalidInput, ServiceError
from vlm_service.images.decode import ImageDecoder
from vlm_service.observability import access
from vlm_service.observability.access import REQUEST_ID_KEY
from vlm_service.observability.tracing import Tracing
from vlm_service.types import Finished, GenerationRequest

logger = logging.getLogger(__name__)

_NO_DEADLINE = 1e8  # seconds; grpc reports a huge remaining time when the RPC has no deadline


class VisionLanguageServicer(pb_grpc.VisionLanguageServiceServicer):
    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        tracing: Tracing | None = None,
        decoder: ImageDecoder | None = None,
    ):
        self.engine = engine
        self.settings = settings
        self.tracing = tracing
        self.decoder = decoder or ImageDecoder.from_settings(settings)

    async def Caption(
        self, request: pb.CaptionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.CaptionResponse]:
        # An async generator itself, as grpc.aio wants a server-streaming handler to be.
        async for response in self._generation(
            "Caption", request, convert.caption_request, convert.caption_response, context
        ):
            yield response

    async def Query(
        self, request: pb.QueryRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.QueryResponse]:
        async for response in self._generation(
            "Query", request, convert.query_request, convert.query_response, context
        ):
            yield response

    async def Detect(
        self, request: pb.DetectRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.DetectResponse]:
        async for response in self._generation(
            "Detect", request, convert.detect_request, convert.detect_response, context
        ):
            yield response

    async def Point(
        self, request: pb.PointRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.PointResponse]:
        async for response in self._generation(
            "Point", request, convert.point_request, convert.point_response, context
        ):
            yield response

    async def Watch(
        self, request_iterator: AsyncIterator[pb.WatchRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchResponse]:
        with self._observed("Watch", "", context) as call:
            first = await anext(aiter(request_iterator), None)
            if first is None:
                raise InvalidInput("config", "the stream ended before its first message, the config")
            config = convert.watch_config(first, self.settings, call.request_id)
            call.model = self.engine.model_name(config.request.model)
            try:
                session = WatchSession(
                    self.engine,
                    self.decoder,
                    config,
                    request_id=call.request_id,
                    deadline=self._deadline(context),
                    tracing=self.tracing,
                )
            except InvalidInput as exc:  # the config does not suit the model (language, length, options)
                raise exc.under("config") from None
            # The RPC's end (cancel, deadline, disconnect) stops the answer being written at once (see _stream).
            context.add_done_callback(lambda _: session.close())
            try:
                await context.send_initial_metadata(((REQUEST_ID_KEY, call.request_id),))
                async for event in session.run(convert.watch_frames(request_iterator)):
                    _record(call, session)  # before the yield: a cancel can end the RPC there
                    yield convert.watch_response(event)
            finally:
                session.close()
                _record(call, session)

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        await context.send_initial_metadata(((REQUEST_ID_KEY, access.request_id()),))
        return pb.ListModelsResponse(models=[convert.model_info(card) for card in self.engine.cards()])

    @contextlib.contextmanager
    def _observed(self, method: str, model: str, context) -> Iterator[access.Call]:
        """The RPC's record (request id, model, tokens), and its count and end-to-end latency by the
        status it ends with (the metrics' requests by final status)."""
        call = access.current_call()
        if call is None:  # called without the access interceptor (unit tests)
            call = access.Call(method, access.new_request_id(), "", time.monotonic())
        call.model = self.engine.model_name(model)
        if self.tracing is not None:
            trace.get_current_span().set_attribute("vlm.request_id", call.request_id)
        recorded = False

        def record(code: str) -> None:
            nonlocal recorded
            if not recorded:
                recorded = True
                metrics = self.engine.metrics
                metrics.requests.labels(method, code).inc()
                metrics.request_duration.labels(method, code).observe(time.monotonic() - call.started)

        def ended_by_client() -> str:
            remaining = context.time_remaining()
            return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"

        # A streaming handler that grpc cancels while it writes a message is left suspended at its
        # ``yield``, and its ``finally`` runs only when the generator is collected (late, or at the
        # next cyclic garbage collection). When the RPC ends, a handler that ended by itself has been
        # counted already; one that has not was stopped by its client (grpc's ``context.cancelled()``
        # is still False then: it reads the status the server set): it is counted here, once.
        context.add_done_callback(lambda _: record(ended_by_client()))
        code = "OK"
        try:
            yield call
        except ServiceError as exc:
            code = status_code(exc).name
            raise
        except (asyncio.CancelledError, GeneratorExit):
            code = ended_by_client()
            raise
        except Exception:
            code = "INTERNAL"
            raise
        finally:
            record(code)

    async def _generation(self, method: str, request, to_domain: Callable, message: Callable, context) -> AsyncIterator:
        """A Caption, Query, Detect or Point: its values checked and made a domain request, its image
        decoded, its answer's events streamed as ``message(event)``."""
        with self._observed(method, request.model, context) as call:
            domain = to_domain(request, self.settings, call.request_id)
            domain = await self._with_images(domain, convert.image_data(request, self.settings))
            async for response in self._stream(domain, message, context, call):
                yield response

    async def _with_images(self, request: GenerationRequest, data: list[bytes]) -> GenerationRequest:
        """The request with its pictures decoded, checked and each reduced to the largest picture its
        model uses (off the event loop, at once). A bad picture among several is named by its index."""
        # Before decoding: pictures the model cannot take, a task (Detect, Point) it cannot do.
        self.engine.check_before_decoding(request, len(data))
        bound = self.engine.image_bound(self.engine.model_name(request.model), request.detail)
        if len(data) == 1:
            image, digest = await self.decoder.decode(data[0], bound)
            return dataclasses.replace(request, image=image, image_digest=digest)
        decoded = await asyncio.gather(
            *(self._picture(index, each, bound) for index, each in enumerate(data)), return_exceptions=True
        )
        failed = next((each for each in decoded if isinstance(each, BaseException)), None)
        if failed is not None:
            raise failed
        (image, digest), *more = decoded
        return dataclasses.replace(
            request,
            image=image,
            image_digest=digest,
            more_images=tuple(each for each, _ in more),
            more_digests=tuple(each for _, each in more),
        )

    async def _picture(self, index: int, data: bytes, bound):
        try:
            return await self.decoder.decode(data, bound)
        except InvalidInput as exc:
            raise InvalidInput(f"images[{index}]", exc.description) from None

    @staticmethod
    def _deadline(context) -> float | None:
        """The RPC's deadline as a time.monotonic() value, or None without one."""
        remaining = context.time_remaining()
        return time.monotonic() + remaining if remaining is not None and remaining < _NO_DEADLINE else None

    async def _stream(self, request: GenerationRequest, message: Callable, context, call: access.Call) -> AsyncIterator:
        """Submit the request (with the RPC's deadline) and stream its job's events as ``message``s."""
        deadline = self._deadline(context)
        if deadline is not None:
            request = dataclasses.replace(request, deadline=deadline)
        model = self.engine.model_name(request.model)
        generation = None
        if self.tracing is not None:
            generation = self.tracing.generation(model, request.request_id, request.arrival)
        job = self.engine.submit(request, trace=generation)
        # The RPC's end (client cancel, disconnect, deadline) stops the generation at once, wherever this
        # handler is suspended: when grpc is cancelled while it writes a message, the generator waits at
        # its ``yield`` and its ``finally`` runs only when the generator is collected, which can be late.
        context.add_done_callback(lambda _: self.engine.release(job))
        logger.debug("request %s queued on %s", request.request_id, model)
        event = None
        try:
            await context.send_initial_metadata(((REQUEST_ID_KEY, request.request_id),))
            async for event in job.events():
                # Before the yield: a cancel can end the RPC there, and its access line is written then.
                call.first_text_at = job.timeline.first_text_at
                yield message(event)
            if isinstance(event, Finished):
                call.prompt_tokens = event.usage.prompt_tokens
                call.completion_tokens = event.usage.completion_tokens
        finally:
            # The RPC ended (finished, cancelled, deadline, disconnect): stop the generation.
            self.engine.release(job)


def _record(call: access.Call, session: WatchSession) -> None:
    """What a Watch stream's access line reports, as of now."""
    call.prompt_tokens, call.completion_tokens = session.prompt_tokens, session.completion_tokens
    call.first_text_at = session.first_text_at
