"""Running a real server on a loopback port inside the test process, and images for requests."""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import threading
import time

import grpc
import torch
from PIL import Image, ImageDraw

from vlm.v1 import vlm_service_pb2 as pb
from vlm.v1 import vlm_service_pb2_grpc as pb_grpc
from vlm_service.config import Settings
from vlm_service.core.job import Job
from vlm_service.server import VLMServer


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


def decode_step_module(model):
    """The module that runs once per forward pass: the model, or for Moondream's remote code (whose
    API never calls the model's own forward) its text model's output layer."""
    text = getattr(getattr(model, "model", None), "text", None)
    return text["lm_head"] if isinstance(text, torch.nn.ModuleDict) and "lm_head" in text else model


class StepCounter:
    """Counts forward passes of a model: one for the prefill and one per further decode step."""

    def __init__(self, model):
        self.count = 0
        self._handle = decode_step_module(model).register_forward_hook(self._hook)

    def _hook(self, *args):
        self.count += 1

    def remove(self):
        self._handle.remove()


def drain(steps) -> tuple[int, object]:
    """Run a generator to its end: how many times it yielded, and what it returned."""
    yielded = 0
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return yielded, done.value
        yielded += 1


def wait_for(condition, timeout: float = 30.0, message: str = "the condition never held", every: float = 0.001):
    """Wait until ``condition()`` is true (a server-side state, polled ``every`` seconds)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(every)


def wait_idle(engine, timeout: float = 30.0) -> None:
    """Wait until no model has a running or queued generation."""
    wait_for(lambda: engine.idle, timeout, "the scheduler never became idle")


class StepGate:
    """Holds or observes a model's generation at its stop checks (the scheduler's ``step_gate`` seam).

    Installed on a scheduler, it is called in the scheduler thread at each stop check of each job (once before
    each chunk of the job's prefill, once for a prefill in one piece, then once per decode step), before the check. While closed, the scheduler waits there,
    so nothing on that model moves: a test can cancel, fill the queue or scrape metrics against a frozen,
    known state, then ``open()`` it. ``trace`` records each call as (job, forward passes so far, running
    jobs). ``hold_when(job)``, if given, closes the gate at the first call for which it is true.
    """

    def __init__(self, scheduler, model=None, closed: bool = False, hold_when=None):
        self._worker = scheduler
        self._cond = threading.Condition()
        self._closed = closed
        self.hold_when = hold_when
        self.held = None  # the job the scheduler waits on while the gate is closed
        self.trace: list[tuple[Job, int, int]] = []
        self._counter = StepCounter(model) if model is not None else None
        scheduler.step_gate = self

    @property
    def forward_passes(self) -> int:
        return self._counter.count

    def __call__(self, job) -> None:
        with self._cond:
            self.trace.append((job, self._counter.count if self._counter else 0, self._worker.running))
            if self.hold_when is not None and self.hold_when(job):
                self._closed, self.hold_when = True, None
            while self._closed:
                self.held = job
                self._cond.notify_all()
                self._cond.wait()
            self.held = None

    def jobs(self) -> list[Job]:
        """The jobs that reached a stop check, in order of their first."""
        return list(dict.fromkeys(job for job, _, _ in self.trace))

    def steps_of(self, job) -> int:
        """Stop checks ``job`` reached so far."""
        return sum(1 for seen, _, _ in self.trace if seen is job)

    def close(self) -> None:
        with self._cond:
            self._closed = True

    def open(self) -> None:
        with self._cond:
            self._closed = False
            self._cond.notify_all()

    def wait_held(self, timeout: float = 30.0, unless=None):
        """Wait until the scheduler waits at the closed gate; returns the job it waits on, or None if
        ``unless()`` became true first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.held is None:
                if unless is not None and unless():
                    return None
                assert time.monotonic() < deadline, "the scheduler never reached the closed gate"
                self._cond.wait(0.01)
            return self.held

    def remove(self) -> None:
        self._worker.step_gate = None
        self.open()
        if self._counter is not None:
            self._counter.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


class Sink:
    """A TextSink for driving a backend's batch directly: keeps what its row writes; ``stop`` ends the
    row at its next stop check."""

    def __init__(self, stop: bool = False):
        self.pieces: list[str] = []
        self.stop = stop

    def add_text(self, piece: str) -> None:
        self.pieces.append(piece)

    def should_stop(self) -> bool:
        return self.stop

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def keep_up(job) -> None:
    """A step gate that paces a generation to its reader: each decode step waits until the RPC has
    taken everything sent so far, so a client that keeps up gets each token's text as its own message."""
    deadline = time.monotonic() + 30
    while job.backlog and time.monotonic() < deadline:
        time.sleep(0.0002)


def request_id(call) -> str:
    return dict(call.initial_metadata())["x-request-id"]


def sample(engine, name: str, **labels) -> float:
    """One sample of the server's Prometheus registry (0 when absent)."""
    return engine.metrics.registry.get_sample_value(name, labels) or 0.0


def steps_with_more_rows_than(engine, model: str, rows: int) -> float:
    """Decode steps of ``model`` so far that ran more than ``rows`` rows (``rows`` a bucket bound)."""
    total = sample(engine, "vlm_batch_size_count", model=model)
    return total - sample(engine, "vlm_batch_size_bucket", model=model, le=str(float(rows)))


def run_rpc(server: ServerThread, request) -> tuple[str, pb.CaptionResponse]:
    """One Caption or Query on its own channel: (its text, its last message)."""
    with server.channel() as channel:
        stub = server.stub(channel)
        method = stub.Query if isinstance(request, pb.QueryRequest) else stub.Caption
        messages = list(method(request))
    return "".join(m.text for m in messages), messages[-1]


def run_as_one_batch(server: ServerThread, model: str, requests: list) -> list[tuple[str, pb.CaptionResponse]]:
    """Run ``requests`` on ``model`` so that they are decoded together: the scheduler is held before the
    first one's prefill until all the others are submitted; then they join the batch at once."""
    served = server.engine.models[model]
    wait_idle(server.engine)
    # The gate is opened (left) before the pool waits for the requests, also when an assertion fails.
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool, StepGate(served.scheduler, closed=True) as gate:
        futures = [pool.submit(run_rpc, server, request) for request in requests]
        gate.wait_held()  # some may have been taken with the first: they are admitted one after another
        scheduler = served.scheduler
        wait_for(
            lambda: scheduler.running + scheduler.queue_depth == len(requests), message="the requests never all queued"
        )
        gate.open()
        return [future.result(timeout=300) for future in futures]


def end_after_chunks(server: ServerThread, stub, model: str, chunks: int = 3, max_new_tokens: int = 1500, end=None):
    """Stream a caption from ``model`` and end its RPC after ``chunks`` text messages: ``end(call)``
    (default: the client cancels). Returns (call, text messages received, forward passes when the server
    had stopped the job, forward passes in all).

    As the RPC ends, the scheduler is held at its next stop check (a StepGate) until the server's handler
    has stopped the job, so the steps after the end are counted from the server's side of it: the trip
    of a cancel across a loaded machine does not count as generation going on after a stop."""
    engine = server.engine
    wait_idle(engine)
    served = engine.models[model]
    received = 0
    with StepGate(served.scheduler, served.backend.model) as gate:
        call = stub.Caption(caption_request(model=model, max_new_tokens=max_new_tokens))
        for message in call:
            received += bool(message.text)
            if received == chunks:
                gate.close()
                (end or type(call).cancel)(call)
                break
        at_end, steps = held_until_stopped(engine, gate)
    return call, received, at_end, steps


def held_until_stopped(engine, gate: StepGate) -> tuple[int, int]:
    """With ``gate`` closed (or about to close) on a job whose RPC is ending: wait until the scheduler is
    held and the server has stopped the job, then let it go on. Returns (forward passes at that moment,
    forward passes once the model is idle). A job that stopped before reaching the gate counts from
    where it stopped."""
    job = gate.wait_held(unless=lambda: engine.idle)
    if job is not None:
        wait_for(lambda: job.cancelled, message="the server never stopped the job")
    at_stop = gate.forward_passes
    gate.open()
    wait_idle(engine)
    return at_stop, gate.forward_passes


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
    detail = options.pop("detail", pb.IMAGE_DETAIL_UNSPECIFIED)
    return pb.CaptionRequest(
        model=model,
        image=pb.Image(data=data),
        length=length,
        options=pb.GenerationOptions(**options),
        response_language=language,
        detail=detail,
    )


def query_request(question: str, image: Image.Image | None = None, **options) -> pb.QueryRequest:
    model = options.pop("model", "")
    language = options.pop("response_language", "")
    detail = options.pop("detail", pb.IMAGE_DETAIL_UNSPECIFIED)
    return pb.QueryRequest(
        model=model,
        image=pb.Image(data=png_bytes(image or shape_image())),
        question=question,
        options=pb.GenerationOptions(**options),
        response_language=language,
        detail=detail,
    )
