"""Running a real server on a loopback port inside the test process, and images for requests."""

from __future__ import annotations

import asyncio
import io
import threading
import time

import grpc
from PIL import Image, ImageDraw

from vlm.v1 import vlm_service_pb2 as pb
from vlm.v1 import vlm_service_pb2_grpc as pb_grpc
from vlm_service.config import Settings
from vlm_service.server import VLMServer
from vlm_service.worker import Job


class ServerThread:
    """A VLMServer on 127.0.0.1:0 with its own event loop in a background thread."""

    def __init__(self, settings: Settings, tracer_provider=None):
        settings.host = "127.0.0.1"
        settings.port = 0
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-server-loop", daemon=True)
        self._thread.start()
        self.server: VLMServer = self.call(VLMServer.start(settings, tracer_provider))
        self.target = f"127.0.0.1:{self.server.port}"

    def call(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def wait_ready(self, timeout: float = 120) -> None:
        self.call(self.server.wait_ready(), timeout)

    @property
    def engine(self):
        return self.server.engine

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.target)

    def stub(self, channel: grpc.Channel) -> pb_grpc.VisionLanguageServiceStub:
        return pb_grpc.VisionLanguageServiceStub(channel)

    def stop(self, grace: float = 0) -> None:
        try:
            self.call(self.server.stop(grace), timeout=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)


class StepCounter:
    """Counts forward passes of a model: one for the prefill and one per further decode step."""

    def __init__(self, module):
        self.count = 0
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, *args):
        self.count += 1

    def remove(self):
        self._handle.remove()


def wait_idle(engine, timeout: float = 10.0) -> None:
    """Wait until no model has a running or queued generation."""
    deadline = time.monotonic() + timeout
    while not engine.idle:
        assert time.monotonic() < deadline, "the worker never became idle"
        time.sleep(0.005)


def cancel_after_chunks(server: ServerThread, stub, model: str, chunks: int = 3, max_new_tokens: int = 1500):
    """Stream a caption from ``model``, cancel it after ``chunks`` text messages, wait until the engine
    is idle. Returns (call, text messages received, decode steps when the server learnt of the cancel,
    decode steps in all), and checks that the cancel reached the server within a few steps.

    The steps are counted from the server's side of the cancel (its handler stopping the job), not
    the client's call: on a loaded machine the model may take a step or two while the cancel crosses
    the connection, which is transport latency, not generation going on after a stop."""
    wait_idle(server.engine)
    counter = StepCounter(server.engine.models[model].backend.model)
    received = at_client_cancel = 0
    at_server_cancel: list[int] = []
    cancel = Job.cancel

    def recording_cancel(job):
        if not job.cancelled and job.request.model == model:
            at_server_cancel.append(counter.count)
        cancel(job)

    Job.cancel = recording_cancel
    try:
        call = stub.Caption(caption_request(model=model, max_new_tokens=max_new_tokens))
        for message in call:
            received += bool(message.text)
            if received == chunks:
                at_client_cancel = counter.count
                call.cancel()
                break
        wait_idle(server.engine)
    finally:
        Job.cancel = cancel
        counter.remove()
    assert at_server_cancel, "the server never stopped the job"
    assert at_server_cancel[0] - at_client_cancel <= 10, "the cancel took more than 10 decode steps to arrive"
    return call, received, at_server_cancel[0], counter.count


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def shape_image(colour: str = "red", size=(96, 64), background: str = "white") -> Image.Image:
    image = Image.new("RGB", size, background)
    w, h = size
    ImageDraw.Draw(image).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=colour)
    return image


def caption_request(image: Image.Image | bytes | None = None, **options) -> pb.CaptionRequest:
    data = image if isinstance(image, bytes) else png_bytes(image or shape_image())
    model = options.pop("model", "")
    length = options.pop("length", pb.CAPTION_LENGTH_UNSPECIFIED)
    language = options.pop("response_language", "")
    return pb.CaptionRequest(
        model=model,
        image=pb.Image(data=data),
        length=length,
        options=pb.GenerationOptions(**options),
        response_language=language,
    )


def query_request(question: str, image: Image.Image | None = None, **options) -> pb.QueryRequest:
    model = options.pop("model", "")
    language = options.pop("response_language", "")
    return pb.QueryRequest(
        model=model,
        image=pb.Image(data=png_bytes(image or shape_image())),
        question=question,
        options=pb.GenerationOptions(**options),
        response_language=language,
    )
