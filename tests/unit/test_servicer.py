"""The servicer and engine with a fake backend, called directly (no socket), and the status mapping."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests import fakes
from tests.helpers import caption_request, query_request
from vlm.v1 import vlm_service_pb2 as pb
from vlm_service.api.interceptors import ErrorInterceptor
from vlm_service.api.servicer import VisionLanguageServicer
from vlm_service.api.status import to_status
from vlm_service.core.engine import Engine
from vlm_service.errors import GenerationFailed, InvalidInput, ModelNotFound, ModelNotReady, QueueFull, ShuttingDown


class FakeContext:
    def __init__(self):
        self.initial_metadata = None
        self.aborted = None
        self.done_callbacks = []

    def add_done_callback(self, callback):
        self.done_callbacks.append(callback)

    async def send_initial_metadata(self, metadata):
        self.initial_metadata = metadata

    async def abort(self, code, details, trailing_metadata=()):
        self.aborted = (code, details, trailing_metadata)
        raise grpc.aio.AbortError()

    def code(self):
        return None

    def time_remaining(self):
        return None

    def cancelled(self):
        return False


@pytest.fixture
def fake_engine(tmp_path, settings):
    fakes.FakeBackend.reset()
    checkpoint = fakes.register(tmp_path)
    settings.models = [f"fake={checkpoint}"]
    engine = Engine(settings)
    yield engine
    fakes.FakeBackend.step_gate = None
    engine.close()


async def collect(stream):
    return [message async for message in stream]


async def test_caption_streams_deltas_then_finish(fake_engine, settings):
    await asyncio.to_thread(fake_engine.load_all)
    servicer = VisionLanguageServicer(fake_engine, settings)
    context = FakeContext()
    messages = await collect(servicer.Caption(caption_request(), context))
    assert "".join(m.text for m in messages[:-1]) == "Hello, world."
    assert all(m.text for m in messages[:-1]), "no empty text messages"
    last = messages[-1]
    assert last.finish_reason == pb.FINISH_REASON_STOP
    assert last.usage.completion_tokens == 5 and last.usage.prompt_tokens == 7
    assert 0 <= last.usage.queue_time_ms <= last.usage.time_to_first_token_ms <= last.usage.total_time_ms
    assert dict(context.initial_metadata)["x-request-id"]


async def test_each_token_is_its_own_message_while_the_client_keeps_up(fake_engine, settings):
    """The model writes a token only after the client has the previous one: nothing is merged."""
    await asyncio.to_thread(fake_engine.load_all)
    permits = fakes.FakeBackend.step_permits = threading.Semaphore(1)
    servicer = VisionLanguageServicer(fake_engine, settings)
    texts = []
    async for message in servicer.Caption(caption_request(), FakeContext()):
        texts.append(message.text)
        permits.release()
    assert texts[:-1] == ["Hello", ",", " wor", "ld", "."]


async def test_text_that_piles_up_unread_leaves_as_one_message(fake_engine, settings):
    """When the model is ahead of the client, what waits is sent together (fewer, larger messages),
    not one message per token behind the rest."""
    await asyncio.to_thread(fake_engine.load_all)
    permits = fakes.FakeBackend.step_permits = threading.Semaphore(1)
    servicer = VisionLanguageServicer(fake_engine, settings)
    stream = servicer.Caption(caption_request(), FakeContext())
    first = await anext(stream)
    permits.release(4)  # the other four tokens are written while the client reads nothing
    while not fake_engine.idle:  # the generation has ended: all of it waits unread
        await asyncio.sleep(0.001)
    rest = await collect(stream)
    assert [first.text] + [m.text for m in rest[:-1]] == ["Hello", ", world."]
    assert rest[-1].usage.completion_tokens == 5


async def test_max_new_tokens_and_stop_strings(fake_engine, settings):
    await asyncio.to_thread(fake_engine.load_all)
    servicer = VisionLanguageServicer(fake_engine, settings)
    messages = await collect(servicer.Query(query_request("hi?", max_new_tokens=2), FakeContext()))
    assert "".join(m.text for m in messages) == "Hello,"
    assert messages[-1].finish_reason == pb.FINISH_REASON_LENGTH
    messages = await collect(servicer.Query(query_request("hi?", stop=["wor"]), FakeContext()))
    assert "".join(m.text for m in messages) == "Hello,"
    assert messages[-1].finish_reason == pb.FINISH_REASON_STOP_SEQUENCE


@pytest.mark.parametrize(
    ("request_", "error", "field"),
    [
        (caption_request(b""), InvalidInput, "image.data"),
        (caption_request(b"GIF89a-broken"), InvalidInput, "image.data"),
        (pb.CaptionRequest(), InvalidInput, "image"),
        (caption_request(model="nope"), ModelNotFound, None),
        (caption_request(top_p=1.5), InvalidInput, "options.top_p"),
        (caption_request(temperature=-1), InvalidInput, "options.temperature"),
        (caption_request(temperature=float("nan")), InvalidInput, "options.temperature"),
        (caption_request(repetition_penalty=-2), InvalidInput, "options.repetition_penalty"),
        (caption_request(max_new_tokens=10**6), InvalidInput, "options.max_new_tokens"),
        (caption_request(stop=["x"] * 9), InvalidInput, "options.stop"),
        (caption_request(stop=["ok", ""]), InvalidInput, "options.stop[1]"),
        (caption_request(stop=["ok", "x" * 65]), InvalidInput, "options.stop[1]"),
        (caption_request(response_language="tlh"), InvalidInput, "response_language"),
        (query_request("   "), InvalidInput, "question"),
        (query_request("x" * 5000), InvalidInput, "question"),
    ],
)
async def test_bad_requests_raise_typed_errors(fake_engine, settings, request_, error, field):
    await asyncio.to_thread(fake_engine.load_all)
    servicer = VisionLanguageServicer(fake_engine, settings)
    method = servicer.Query if isinstance(request_, pb.QueryRequest) else servicer.Caption
    with pytest.raises(error) as info:
        await collect(method(request_, FakeContext()))
    if field is not None:
        assert info.value.violations[0].field == field


async def test_exactly_the_limit_of_stop_strings_is_accepted_and_each_of_them_stops(fake_engine, settings):
    """Eight stop strings (the limit; nine are refused above), each 64 characters or fewer: accepted,
    and the one the text meets (the last of the eight) stops it."""
    await asyncio.to_thread(fake_engine.load_all)
    servicer = VisionLanguageServicer(fake_engine, settings)
    stops = [f"never-{i}" for i in range(settings.max_stop_sequences - 1)] + ["wor"]
    assert len(stops) == settings.max_stop_sequences == 8
    messages = await collect(servicer.Query(query_request("hi?", stop=stops), FakeContext()))
    assert "".join(m.text for m in messages) == "Hello,"
    assert messages[-1].finish_reason == pb.FINISH_REASON_STOP_SEQUENCE


async def test_requests_before_load_are_unavailable(fake_engine, settings):
    servicer = VisionLanguageServicer(fake_engine, settings)
    with pytest.raises(ModelNotReady):
        await collect(servicer.Caption(caption_request(), FakeContext()))


async def test_full_queue_is_refused_at_once_and_cancelled_queued_jobs_never_start(fake_engine, settings):
    fake_engine.settings.max_queue = 1
    await asyncio.to_thread(fake_engine.load_all)
    gate = threading.Event()
    fakes.FakeBackend.step_gate = gate
    servicer = VisionLanguageServicer(fake_engine, settings)
    backend = fakes.FakeBackend.instances[-1]

    running = asyncio.ensure_future(collect(servicer.Caption(caption_request(), FakeContext())))
    while not backend.started:  # the first request is running (blocked on the gate)
        await asyncio.sleep(0.01)
    queued_context = FakeContext()
    queued = asyncio.ensure_future(collect(servicer.Caption(caption_request(), queued_context)))
    while queued_context.initial_metadata is None:
        await asyncio.sleep(0.01)
    with pytest.raises(QueueFull):
        await collect(servicer.Caption(caption_request(), FakeContext()))

    queued.cancel()  # the RPC of the queued request ends: its handler releases the job
    with pytest.raises(asyncio.CancelledError):
        await queued
    assert fake_engine.models["fake"].scheduler.queue_depth == 0, "the cancelled request left the queue"
    gate.set()
    messages = await running
    assert messages[-1].finish_reason == pb.FINISH_REASON_STOP
    while not fake_engine.idle:  # the scheduler has taken everything it will take
        await asyncio.sleep(0.001)
    assert len(backend.started) == 1, "the cancelled queued request must never start"
    assert dict(queued_context.initial_metadata)["x-request-id"] not in backend.started


async def test_generation_failure_is_internal_and_the_next_request_works(fake_engine, settings):
    await asyncio.to_thread(fake_engine.load_all)
    servicer = VisionLanguageServicer(fake_engine, settings)
    fakes.FakeBackend.fail_next = True
    with pytest.raises(GenerationFailed) as info:
        await collect(servicer.Caption(caption_request(), FakeContext()))
    assert "boom" not in info.value.message and "/secret" not in info.value.message
    messages = await collect(servicer.Caption(caption_request(), FakeContext()))
    assert messages[-1].finish_reason == pb.FINISH_REASON_STOP


async def test_draining_refuses_new_requests(fake_engine, settings):
    await asyncio.to_thread(fake_engine.load_all)
    fake_engine.start_draining()
    servicer = VisionLanguageServicer(fake_engine, settings)
    with pytest.raises(ShuttingDown):
        await collect(servicer.Caption(caption_request(), FakeContext()))
    models = (await servicer.ListModels(pb.ListModelsRequest(), FakeContext())).models
    assert not models[0].ready


async def test_an_rpc_cancelled_mid_write_is_counted_when_it_ends_and_only_once(fake_engine, settings):
    """grpc leaves a streaming handler that it cancels while writing suspended at its ``yield`` (its
    ``finally`` runs when the generator is collected, maybe much later) and ends the RPC: the done
    callbacks run, with ``context.cancelled()`` still False (it reads the status the server set; so in
    grpc 1.85's aio server). The RPC is counted CANCELLED then, and not again at collection."""
    await asyncio.to_thread(fake_engine.load_all)
    fakes.FakeBackend.step_permits = threading.Semaphore(1)
    servicer = VisionLanguageServicer(fake_engine, settings)
    context = FakeContext()
    counted = fake_engine.metrics.requests.labels("Caption", "CANCELLED")
    before = counted._value.get()
    stream = servicer.Caption(caption_request(), context)
    assert (await anext(stream)).text  # suspended at its yield, as grpc leaves it
    for callback in context.done_callbacks:  # the RPC ends
        callback(context)
    assert counted._value.get() == before + 1
    await stream.aclose()  # collected at last: GeneratorExit in the handler
    assert counted._value.get() == before + 1
    assert fake_engine.metrics.requests.labels("Caption", "OK")._value.get() == 0


async def test_list_models(fake_engine, settings):
    await asyncio.to_thread(fake_engine.load_all)
    servicer = VisionLanguageServicer(fake_engine, settings)
    (info,) = (await servicer.ListModels(pb.ListModelsRequest(), FakeContext())).models
    assert (info.name, info.family, info.ready, info.is_default) == ("fake", "fake", True, True)
    assert list(info.response_languages) == ["en", "ja"]
    assert info.max_new_tokens_limit == settings.max_new_tokens_limit


# --- status mapping --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidInput("options.top_p", "bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (ModelNotFound("x", ["a"]), grpc.StatusCode.NOT_FOUND),
        (ModelNotReady("loading"), grpc.StatusCode.UNAVAILABLE),
        (ShuttingDown("draining"), grpc.StatusCode.UNAVAILABLE),
        (QueueFull("full", retry_after=2.5), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (GenerationFailed("abc123"), grpc.StatusCode.INTERNAL),
    ],
)
def test_status_mapping(error, code):
    assert to_status(error).code == code


def test_rich_details():
    status = to_status(InvalidInput("options.top_p", "must be in (0, 1]"))
    metadata = dict(status.trailing_metadata)
    proto = rpc_status.status_pb2.Status.FromString(metadata["grpc-status-details-bin"])
    bad_request = error_details_pb2.BadRequest()
    assert proto.details[0].Unpack(bad_request)
    assert bad_request.field_violations[0].field == "options.top_p"

    status = to_status(QueueFull("full", retry_after=2.5))
    proto = rpc_status.status_pb2.Status.FromString(dict(status.trailing_metadata)["grpc-status-details-bin"])
    retry = error_details_pb2.RetryInfo()
    assert proto.details[0].Unpack(retry)
    assert retry.retry_delay.ToMilliseconds() == 2500


def test_retry_hints_also_go_out_as_grpc_retry_pushback():
    """gRPC's retry policies read the server's delay from `grpc-retry-pushback-ms`, not from RetryInfo."""
    for error, pushback in ((QueueFull("full", retry_after=2.5), "2500"), (ModelNotReady("loading"), "1000")):
        metadata = dict(to_status(error).trailing_metadata)
        proto = rpc_status.status_pb2.Status.FromString(metadata["grpc-status-details-bin"])
        retry = error_details_pb2.RetryInfo()
        assert proto.details[0].Unpack(retry)
        assert metadata["grpc-retry-pushback-ms"] == pushback == str(retry.retry_delay.ToMilliseconds())
    assert "grpc-retry-pushback-ms" not in dict(to_status(ShuttingDown("draining")).trailing_metadata)


async def test_unexpected_exceptions_become_opaque_internal():
    context = FakeContext()
    with pytest.raises(grpc.aio.AbortError):
        await ErrorInterceptor().handle_exception(KeyError("/etc/secret"), None, context, "/vlm.v1.X/Caption")
    code, details, trailers = context.aborted
    assert code == grpc.StatusCode.INTERNAL
    request_id = dict(trailers)["x-request-id"]
    assert "secret" not in details and details.endswith(f"request id {request_id}")


async def test_a_job_whose_output_is_not_taken_stops_itself():
    """Back-pressure guard: output piling up unread for `abandon_after` seconds stops the generation."""
    import time

    from tests.helpers import shape_image
    from vlm_service.core.job import Job
    from vlm_service.types import GenerationRequest, SamplingParams, Task

    request = GenerationRequest("r", "m", Task.CAPTION, shape_image(), SamplingParams(10))
    job = Job(request, asyncio.get_running_loop(), abandon_after=0.2)
    for _ in range(100):
        job.add_text("x ")
    assert not job.should_stop(), "a client that read recently is not abandoned"
    job.last_taken = time.monotonic() - 1.0
    assert job.should_stop() and job.abandoned and not job.cancelled  # its RPC still waits for the outcome
    fresh = Job(request, asyncio.get_running_loop(), abandon_after=0.2)
    fresh.add_text("few")
    fresh.last_taken = time.monotonic() - 1.0
    assert not fresh.should_stop(), "a small backlog is not a vanished client"
