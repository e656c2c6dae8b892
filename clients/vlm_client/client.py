"""The friendly client: ``VLMClient`` (blocking) and ``AsyncVLMClient`` (asyncio).

    from vlm_client import VLMClient

    with VLMClient("localhost:50051") as client:
        stream = client.caption("cat.jpg", length="short")
        for text in stream:
            print(text, end="", flush=True)
        print(stream.finish_reason, stream.usage)

A stream yields text chunks as the model writes them. After the last chunk, ``finish_reason``,
``usage`` and ``text`` (everything received) are set. Leaving the loop early, ``cancel()`` or closing
the client stops the generation on the server. Failures raise :class:`~vlm_client.errors.VLMError`
subclasses carrying the gRPC status code and the server's rich details (retry hint, field violations).

The channel is opened with :data:`SERVICE_CONFIG` (client-side ``round_robin`` over every address the
target resolves to and a retry policy for ``UNAVAILABLE``; client-side health checking on request) and
:data:`CONNECTION_OPTIONS`; ``options`` passed to a client override them key by key.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Sequence
from typing import Generic, TypeVar

import grpc

from vlm.v1 import vlm_service_pb2 as pb
from vlm.v1 import vlm_service_pb2_grpc as pb_grpc

from . import _messages as m
from .errors import VLMError, from_rpc_error, from_status
from .images import ImageLike

Metadata = Sequence[tuple[str, str]]
S = TypeVar("S")  # a client's text stream type
W = TypeVar("W")  # a client's Watch stream type
R = TypeVar("R")  # a client's Detect/Point stream type

#: The metadata key that carries the request's model, so a proxy (an Envoy/Gateway API GRPCRoute, nginx)
#: can route by model without parsing the message. Sent when the request names a model.
MODEL_HEADER = "x-vlm-model"

#: gRPC retries an attempt that failed with UNAVAILABLE (server unreachable, restarting, draining or
#: still loading) while the call has not yet received anything from a server; once a message (or the
#: response headers) arrived, the failure is the caller's to see. At most 5 attempts, with exponential,
#: jittered backoff of at most 1.5 s in all, so an unreachable or misconfigured server (a failed TLS
#: handshake) still surfaces as UNAVAILABLE, with its reason, inside a few seconds' deadline; waiting
#: out a restart is wait_for_ready's job. A server's ``grpc-retry-pushback-ms`` trailer (vlm-service
#: sends it beside every ``google.rpc.RetryInfo``) replaces the backoff with the server's delay.
#: CANCELLED is retried too, under the same rule (nothing received yet): vlm-service never sends it,
#: but gRPC's server core does, to a call that reaches a server in the instant its shutdown starts
#: (the last moment of a drain, before the client or a proxy has read the server's GOAWAY); a call the
#: caller cancels ends on the client's side and is never retried.
RETRY_POLICY = {
    "maxAttempts": 5,
    "initialBackoff": "0.1s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
}

#: round_robin spreads calls over every address the target resolves to (``dns:///vlm.ns.svc:50051``
#: with a headless Kubernetes Service: one subchannel per pod); for one address it behaves like
#: pick_first.
SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [{"name": [{"service": "vlm.v1.VisionLanguageService"}], "retryPolicy": RETRY_POLICY}],
}

#: Client-side health checking (``health_check=True``): the channel watches each server's grpc.health.v1
#: status (the overall service, "") and sends calls only to servers that report SERVING, so a loading or
#: draining server gets no new calls, and a wait-for-ready call waits for SERVING rather than for a
#: connection. Off by default: behind a proxy (nginx, Envoy) the watched health is that of whichever
#: backend the proxy picked for the watch, and a proxy's idle timeout breaks the watch stream; both
#: would stop calls that the proxy could have served. Turn it on for direct connections.
HEALTH_CHECK_CONFIG = {"serviceName": ""}

#: HTTP/2 keepalive while calls are open: a ping every 30 s, answered within 10 s, else the connection
#: (and its calls) fail with UNAVAILABLE, so a stream from a server that vanished without closing
#: (power loss, network partition) does not hang. vlm-service accepts client pings every 5 s or more.
#: Reconnection to a server that went away backs off from 1 s up to 5 s (gRPC's default cap is 120 s),
#: so a restarted server gets calls again within about 5 s.
CONNECTION_OPTIONS = {
    "grpc.keepalive_time_ms": 30_000,
    "grpc.keepalive_timeout_ms": 10_000,
    "grpc.keepalive_permit_without_calls": 0,
    "grpc.http2.max_pings_without_data": 0,
    "grpc.initial_reconnect_backoff_ms": 1_000,
    "grpc.max_reconnect_backoff_ms": 5_000,
}


def channel_options(options: Sequence[tuple[str, object]] = (), health_check: bool = False) -> list[tuple[str, object]]:
    """The client's default channel options (service config, retries, keepalive, reconnection; client-side
    health checking with ``health_check``) with ``options`` overriding them key by key.
    ``("grpc.service_config", json)`` replaces the whole service config; ``("grpc.enable_retries", 0)``
    turns retries off."""
    config = {**SERVICE_CONFIG, "healthCheckConfig": HEALTH_CHECK_CONFIG} if health_check else SERVICE_CONFIG
    merged: dict[str, object] = {
        "grpc.service_config": json.dumps(config),
        "grpc.enable_retries": 1,
        **CONNECTION_OPTIONS,
    }
    merged.update(dict(options))
    return list(merged.items())


class _StreamState:
    """What a stream has received so far (shared by the sync and async streams): its end, and what
    :meth:`absorb` keeps of each message (the text streams' chunks, the region streams' regions)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.chunks: list[str] = []
        self.finish_reason: str | None = None
        self.usage: m.Usage | None = None
        self.request_id: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.chunks)

    def absorb(self, message):
        """What the message carries for the caller (falsy: nothing to yield)."""
        self._end(message)
        if message.text:
            self.chunks.append(message.text)
        return message.text

    def _end(self, message) -> None:
        if message.finish_reason:
            self.finish_reason = m.FINISH_REASONS.get(message.finish_reason, "unknown")
            self.usage = m.usage_from(message)


class _RegionState(_StreamState):
    """A Detect or Point stream's state: the regions found so far, and what the model wrote that was
    not one (``malformed``: it never ends the stream)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.regions: list = []
        self.malformed: list[m.Malformed] = []

    def absorb(self, message):
        self._end(message)
        region = m.region_from(message)
        if region is not None:
            self.regions.append(region)
        if message.HasField("malformed"):
            self.malformed.append(m.Malformed(message.malformed.text, message.malformed.reason))
        return region


class _Stream(_StreamState):
    """An iterator of what a server-streaming call carries, message by message."""

    def __init__(self, call):
        super().__init__()
        self._call = call

    def __iter__(self):
        try:
            for message in self._call:
                if self.request_id is None:
                    self.request_id = m.request_id(self._call.initial_metadata())
                item = self.absorb(message)
                if item:
                    yield item
        except grpc.RpcError as error:
            raise from_rpc_error(error, self.request_id) from None
        finally:
            if self.finish_reason is None:
                self._call.cancel()

    def cancel(self) -> None:
        """Stop the generation on the server."""
        self._call.cancel()


class _AsyncStream(_StreamState):
    """An async iterator of what a server-streaming call carries, message by message."""

    def __init__(self, call):
        super().__init__()
        self._call = call

    async def __aiter__(self):
        try:
            async for message in self._call:
                if self.request_id is None:
                    self.request_id = m.request_id(await self._call.initial_metadata())
                item = self.absorb(message)
                if item:
                    yield item
        except grpc.RpcError as error:
            raise from_rpc_error(error, self.request_id) from None
        finally:
            if self.finish_reason is None:
                self._call.cancel()

    def cancel(self) -> None:
        """Stop the generation on the server."""
        self._call.cancel()


class TextStream(_Stream):
    """An iterator of text chunks from a Caption or Query call."""

    def __iter__(self) -> Iterator[str]:
        return super().__iter__()

    def result(self) -> str:
        """Read the whole stream; return the full text."""
        for _ in self:
            pass
        return self.text


class AsyncTextStream(_AsyncStream):
    """An async iterator of text chunks from a Caption or Query call."""

    def __aiter__(self) -> AsyncIterator[str]:
        return super().__aiter__()

    async def result(self) -> str:
        async for _ in self:
            pass
        return self.text


class RegionStream(_RegionState, _Stream):
    """An iterator of the :class:`~vlm_client.Box` es (Detect) or :class:`~vlm_client.Point` s (Point)
    a model finds, each as soon as it is decoded; ``malformed`` lists what the model wrote that was not
    one."""

    def __iter__(self) -> Iterator[m.Box | m.Point]:
        return super().__iter__()

    def result(self) -> list:
        """Read the whole stream; return every region."""
        for _ in self:
            pass
        return self.regions


class AsyncRegionStream(_RegionState, _AsyncStream):
    """The asyncio twin of :class:`RegionStream`."""

    def __aiter__(self) -> AsyncIterator[m.Box | m.Point]:
        return super().__aiter__()

    async def result(self) -> list:
        async for _ in self:
            pass
        return self.regions


class _FrameState:
    """What a Watch stream has received about one frame (shared by the sync and async answers)."""

    def __init__(self, message, request_id: str | None):
        self.frame_id: int = message.frame_id
        self.chunks: list[str] = []
        self.finish_reason: str | None = None
        self.usage: m.Usage | None = None
        self.frames_skipped = 0
        self.error: VLMError | None = None
        self._request_id = request_id
        self._absorb(message)

    @property
    def text(self) -> str:
        return "".join(self.chunks)

    @property
    def done(self) -> bool:
        """Whether the frame's last message has come (its finish_reason, or its error)."""
        return self.finish_reason is not None or self.error is not None

    def _absorb(self, message) -> None:
        if message.HasField("error"):
            self.error = from_status(message.error, self._request_id)
            self.frames_skipped = message.frames_skipped
            return
        if message.text:
            self.chunks.append(message.text)
        if message.finish_reason:
            self.finish_reason = m.FINISH_REASONS.get(message.finish_reason, "unknown")
            self.usage = m.usage_from(message)
            self.frames_skipped = message.frames_skipped


class FrameAnswer(_FrameState):
    """One frame's answer in a Watch stream: iterate it for its text as the model writes it.

    Once it is done: ``text``, ``finish_reason`` (``"stop"``, ``"length"``, ``"stop_sequence"``, or
    ``"interrupted"`` when a newer frame stopped it), ``usage`` (measured from the frame's arrival at
    the server) and ``frames_skipped`` (frames the server skipped since the previous answered or
    refused frame). A frame the server could not use (a bad image, a frame id that does not increase)
    has ``error`` (a :class:`~vlm_client.errors.VLMError`), ``frames_skipped`` and no text; the stream
    goes on.
    """

    def __init__(self, stream: WatchStream, message):
        super().__init__(message, stream.request_id)
        self._stream = stream

    def __iter__(self) -> Iterator[str]:
        """The text chunks: those already received, then the others as they come."""
        sent = 0
        while True:
            while sent < len(self.chunks):
                sent += 1
                yield self.chunks[sent - 1]
            if self.done:
                return
            message = self._stream._next()
            if message is None:
                return
            if message.frame_id != self.frame_id:  # (the server never interleaves frames)
                self._stream._peeked = message
                return
            self._absorb(message)

    def result(self) -> str:
        """Read the rest of the answer; return its full text ("" for a frame with an error)."""
        for _ in self:
            pass
        return self.text


class AsyncFrameAnswer(_FrameState):
    """The asyncio twin of :class:`FrameAnswer`: ``async for text in answer``."""

    def __init__(self, stream: AsyncWatchStream, message):
        super().__init__(message, stream.request_id)
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[str]:
        sent = 0
        while True:
            while sent < len(self.chunks):
                sent += 1
                yield self.chunks[sent - 1]
            if self.done:
                return
            message = await self._stream._next()
            if message is None:
                return
            if message.frame_id != self.frame_id:
                self._stream._peeked = message
                return
            self._absorb(message)

    async def result(self) -> str:
        async for _ in self:
            pass
        return self.text


class _FrameFeed:
    """The request stream of a Watch call: its config, then one message per frame as ``frames`` gives
    them. An exception raised while reading ``frames`` (an unreadable file) cancels the call and is
    raised to the caller by the stream, not lost in gRPC's sending thread."""

    def __init__(self, config: pb.WatchRequest, frames):
        self._config = config
        self._frames = frames
        self.error: BaseException | None = None
        self.call = None

    def _failed(self, error: Exception) -> None:
        self.error = error
        if self.call is not None:
            self.call.cancel()

    def __iter__(self) -> Iterator[pb.WatchRequest]:
        yield self._config
        try:
            for index, item in enumerate(self._frames):
                yield m.watch_frame(item, index)
        except Exception as error:
            self._failed(error)

    async def messages(self) -> AsyncIterator[pb.WatchRequest]:
        """The asyncio client's requests. No frame is written once the call has ended: grpc.aio reports
        a write that fails because the server already ended the call as INTERNAL ("Internal error from
        Core"), in place of the server's status (grpc/grpc#36066). So the frames wait for the server's
        headers, which it sends once it has accepted the config (a refused config ends the call first),
        and stop as soon as the call is done."""
        yield self._config
        call = self.call
        if call is not None:
            await call.initial_metadata()
        try:
            index = 0
            frames = self._frames if hasattr(self._frames, "__aiter__") else _as_async(self._frames)
            async for item in frames:
                if call is not None and call.done():
                    return
                yield m.watch_frame(item, index)
                index += 1
        except Exception as error:
            self._failed(error)


async def _as_async(items: Iterable) -> AsyncIterator:
    for item in items:
        yield item


class WatchStream:
    """The answers of a Watch call: iterate it for one :class:`FrameAnswer` per answered (or refused)
    frame, in order; each streams its text. The frames are sent as the iterable gives them (from
    gRPC's sending thread, so a paced iterable paces the feed); when it ends, the server finishes the
    answers due and the stream ends. Leaving the loop early or ``cancel()`` ends the call and stops
    the answer being written."""

    def __init__(self, call, feed: _FrameFeed):
        self._call = call
        self._feed = feed
        feed.call = call
        if feed.error is not None:  # failed before the call was known
            call.cancel()
        self._messages = iter(call)
        self._peeked = None
        self._finished = False
        self.request_id: str | None = None

    def __iter__(self) -> Iterator[FrameAnswer]:
        try:
            while (message := self._next()) is not None:
                answer = FrameAnswer(self, message)
                yield answer
                answer.result()  # the rest of its messages, if the caller did not read them
            self._finished = True
        finally:
            if not self._finished:
                self._call.cancel()

    def _next(self):
        if self._peeked is not None:
            message, self._peeked = self._peeked, None
            return message
        try:
            message = next(self._messages)
        except StopIteration:
            if self._feed.error is not None:
                raise self._feed.error from None
            return None
        except grpc.RpcError as error:
            if self._feed.error is not None:
                raise self._feed.error from None
            raise from_rpc_error(error, self.request_id) from None
        if self.request_id is None:
            self.request_id = m.request_id(self._call.initial_metadata())
        return message

    def cancel(self) -> None:
        """End the call: the server stops the answer it is writing."""
        self._call.cancel()


class AsyncWatchStream:
    """The asyncio twin of :class:`WatchStream`: ``async for answer in stream: async for text in answer``."""

    def __init__(self, call, feed: _FrameFeed):
        self._call = call
        self._feed = feed
        feed.call = call
        if feed.error is not None:
            call.cancel()
        self._peeked = None
        self._finished = False
        self.request_id: str | None = None

    async def __aiter__(self) -> AsyncIterator[AsyncFrameAnswer]:
        try:
            while (message := await self._next()) is not None:
                answer = AsyncFrameAnswer(self, message)
                yield answer
                await answer.result()
            self._finished = True
        finally:
            if not self._finished:
                self._call.cancel()

    async def _next(self):
        if self._peeked is not None:
            message, self._peeked = self._peeked, None
            return message
        try:
            message = await self._call.read()
        except grpc.RpcError as error:
            if self._feed.error is not None:
                raise self._feed.error from None
            raise from_rpc_error(error, self.request_id) from None
        if message is grpc.aio.EOF:
            if self._feed.error is not None:
                raise self._feed.error from None
            return None
        if self.request_id is None:
            self.request_id = m.request_id(await self._call.initial_metadata())
        return message

    def cancel(self) -> None:
        self._call.cancel()


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as handle:
        return handle.read()


def channel_credentials(
    tls: bool = False, ca_cert: str | None = None, client_cert: str | None = None, client_key: str | None = None
) -> grpc.ChannelCredentials | None:
    """TLS credentials from PEM files (None for plaintext). ``ca_cert`` defaults to the system roots;
    ``client_cert`` and ``client_key`` are for mutual TLS."""
    if not (tls or ca_cert or client_cert or client_key):
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_cert), private_key=_read(client_key), certificate_chain=_read(client_cert)
    )


def _open(api, target: str, credentials, options, health_check: bool):
    """A channel from ``api`` (``grpc`` or ``grpc.aio``) with :func:`channel_options`: TLS with
    credentials, else plaintext."""
    options = channel_options(options, health_check)
    if credentials is not None:
        return api.secure_channel(target, credentials, options=options)
    return api.insecure_channel(target, options=options)


class _ClientBase(Generic[S, R, W]):
    """What the blocking and the asyncio client share: their calls are built the same way and differ
    only in the stream types that wrap them (``_text_stream``, ``_watch_stream``) and in how a Watch
    stream reads its frames (``_frames``)."""

    _text_stream: Callable[[object], S]
    _region_stream: Callable[[object], R]
    _watch_stream: Callable[[object, _FrameFeed], W]

    def __init__(
        self,
        target: str,
        timeout: float | None,
        metadata: Metadata | None,
        channel,
        token: str | None,
        wait_for_ready: bool | None,
    ):
        self.target = target
        self.timeout = timeout
        self.metadata = tuple(metadata or ()) + ((("authorization", f"Bearer {token}"),) if token else ())
        self.wait_for_ready = wait_for_ready
        self._channel = channel
        self._stub = pb_grpc.VisionLanguageServiceStub(channel)

    def _call_args(self, timeout: float | None, metadata: Metadata | None, model: str = "") -> dict:
        routing = ((MODEL_HEADER, model),) if model else ()
        return {
            "timeout": self.timeout if timeout is None else timeout,
            "metadata": self.metadata + routing + tuple(metadata or ()),
            "wait_for_ready": self.wait_for_ready,
        }

    def caption(
        self,
        image: ImageLike,
        *,
        model: str = "",
        length: str | None = None,
        language: str = "",
        detail: str | None = None,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **options,
    ) -> S:
        """Stream a caption of ``image``. ``detail``: "auto", "low" (one view, the fastest first text)
        or "high" (the model's full tiling); ``ModelInfo.image_details`` says what each does on a
        model. ``options``: max_new_tokens, temperature, top_p, top_k, repetition_penalty, stop, seed."""
        request = m.caption_request(image, model, length, language, detail, **options)
        return self._text_stream(self._stub.Caption(request, **self._call_args(timeout, metadata, model)))

    def query(
        self,
        image: ImageLike | Sequence[ImageLike],
        question: str,
        *,
        model: str = "",
        language: str = "",
        detail: str | None = None,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **options,
    ) -> S:
        """Stream the answer to ``question`` about ``image``, or about several pictures (a list or tuple
        of them, in the order the question refers to them; ``ModelInfo.max_images`` says how many a
        model takes)."""
        request = m.query_request(image, question, model, language, detail, **options)
        return self._text_stream(self._stub.Query(request, **self._call_args(timeout, metadata, model)))

    def detect(
        self,
        image: ImageLike,
        object: str,  # noqa: A002 (the RPC's field name)
        *,
        max_objects: int = 0,
        model: str = "",
        detail: str | None = None,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> R:
        """Stream a :class:`~vlm_client.Box` around every ``object`` ("red circle", "face") in ``image``,
        each as soon as the model has it (at most ``max_objects``; 0: the server's default). Boxes are
        normalized to the picture (0..1); ``Box.pixels(width, height)`` scales one. A model that does not
        detect (``ModelInfo.detects``) raises :class:`~vlm_client.errors.FailedPrecondition`."""
        request = m.grounding_request(pb.DetectRequest, image, object, model, max_objects, detail)
        return self._region_stream(self._stub.Detect(request, **self._call_args(timeout, metadata, model)))

    def point(
        self,
        image: ImageLike,
        object: str,  # noqa: A002 (the RPC's field name)
        *,
        max_objects: int = 0,
        model: str = "",
        detail: str | None = None,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> R:
        """Stream a :class:`~vlm_client.Point` on every ``object`` in ``image``, each as soon as the model
        has it; as :meth:`detect` otherwise (``ModelInfo.points`` says which models point)."""
        request = m.grounding_request(pb.PointRequest, image, object, model, max_objects, detail)
        return self._region_stream(self._stub.Point(request, **self._call_args(timeout, metadata, model)))

    def watch(
        self,
        frames: Iterable | AsyncIterable,
        question: str = "",
        *,
        policy: str | None = None,
        model: str = "",
        length: str | None = None,
        language: str = "",
        detail: str | None = None,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **options,
    ) -> W:
        """Answer ``question`` (empty: a caption of ``length``) about each frame of a live feed, as the
        server's ``policy`` (``"latest"``, the default, or ``"interrupt"``) allows. ``frames`` is any
        iterable of images (path, bytes, file object or PIL image; ids 0, 1, 2, ...) or of
        ``(frame_id, image)`` pairs with increasing ids; the asyncio client also takes an async
        iterable (a paced feed should be one: a plain iterable is read on the event loop). ``timeout``
        is the whole stream's deadline; unlike the other calls, a Watch stream has none unless given
        one (the client's default ``timeout`` is for single answers)."""
        feed = _FrameFeed(m.watch_config(question, model, length, language, policy, detail, **options), frames)
        args = {**self._call_args(timeout, metadata, model), "timeout": timeout}
        return self._watch_stream(self._stub.Watch(self._frames(feed), **args), feed)

    @staticmethod
    def _frames(feed: _FrameFeed):
        return iter(feed)


class VLMClient(_ClientBase[TextStream, RegionStream, WatchStream]):
    """Blocking client. ``target`` is ``host:port`` or any gRPC target (``dns:///name:port`` to balance
    over every address of a name); ``timeout`` (seconds) is the default deadline; ``token`` is sent as
    ``authorization: Bearer`` metadata; ``credentials`` (see :func:`channel_credentials`) turns on TLS;
    ``wait_for_ready=True`` makes calls wait (up to their deadline) for a reachable server instead of
    failing with UNAVAILABLE when none is; ``health_check=True`` turns on client-side health checking
    (:data:`HEALTH_CHECK_CONFIG`: only servers whose health says SERVING get calls, and wait-for-ready
    calls wait for SERVING); ``options`` are channel options that override the defaults
    (:func:`channel_options`)."""

    _text_stream = TextStream
    _region_stream = RegionStream
    _watch_stream = WatchStream

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        channel: grpc.Channel | None = None,
        options: Sequence[tuple[str, object]] = (),
        wait_for_ready: bool | None = None,
        health_check: bool = False,
    ):
        channel = channel or _open(grpc, target, credentials, options, health_check)
        super().__init__(target, timeout, metadata, channel, token, wait_for_ready)

    def models(self, *, timeout: float | None = None, metadata: Metadata | None = None) -> list[m.ModelInfo]:
        try:
            reply = self._stub.ListModels(pb.ListModelsRequest(), **self._call_args(timeout, metadata))
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return [m.model_info_from(info) for info in reply.models]

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> VLMClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncVLMClient(_ClientBase[AsyncTextStream, AsyncRegionStream, AsyncWatchStream]):
    """The asyncio twin of :class:`VLMClient` (the same arguments and calls); streams are async iterators."""

    _text_stream = AsyncTextStream
    _region_stream = AsyncRegionStream
    _watch_stream = AsyncWatchStream

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        channel: grpc.aio.Channel | None = None,
        options: Sequence[tuple[str, object]] = (),
        wait_for_ready: bool | None = None,
        health_check: bool = False,
    ):
        channel = channel or _open(grpc.aio, target, credentials, options, health_check)
        super().__init__(target, timeout, metadata, channel, token, wait_for_ready)

    @staticmethod
    def _frames(feed: _FrameFeed):
        return feed.messages()

    async def models(self, *, timeout: float | None = None, metadata: Metadata | None = None) -> list[m.ModelInfo]:
        try:
            reply = await self._stub.ListModels(pb.ListModelsRequest(), **self._call_args(timeout, metadata))
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return [m.model_info_from(info) for info in reply.models]

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncVLMClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
