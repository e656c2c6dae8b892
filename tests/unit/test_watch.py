"""The Watch RPC through the servicer with the fake model, called directly (no socket).

Generation is held or paced with the scheduler's step gate (tests.helpers.StepGate) and the fake model's
knobs, so which frames are answered, skipped or interrupted is decided by server-side events, never by
timing."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2

from tests import fakes
from tests.helpers import StepGate, caption_request, png_bytes, sample, shape_image
from vlm.v1 import vlm_service_pb2 as pb
from vlm_service.api.servicer import VisionLanguageServicer
from vlm_service.api.watch import OUTCOMES
from vlm_service.core.engine import Engine
from vlm_service.errors import InvalidInput, MalformedMessage, ModelNotFound, QueueFull, ShuttingDown
from vlm_service.images import decode as image_decoding

from .test_servicer import FakeContext, collect

FULL = "Hello, world."
IMAGE = png_bytes(shape_image())


@pytest.fixture
async def engine(tmp_path, settings):
    fakes.FakeBackend.reset()
    checkpoint = fakes.register(tmp_path)
    settings.models = [f"fake={checkpoint}"]
    engine = Engine(settings)
    await asyncio.to_thread(engine.load_all)
    yield engine
    fakes.FakeBackend.step_gate = None
    engine.models["fake"].scheduler.step_gate = None
    engine.close()


@pytest.fixture
def servicer(engine, settings):
    return VisionLanguageServicer(engine, settings)


class Feed:
    """The caller's side of a Watch stream: messages go in as the test puts them; ``end()`` half-closes."""

    def __init__(self, *messages):
        self._queue: asyncio.Queue = asyncio.Queue()
        for message in messages:
            self.put(message)

    def put(self, message) -> None:
        self._queue.put_nowait(message)

    def config(self, **fields) -> Feed:
        self.put(pb.WatchRequest(config=pb.WatchConfig(**fields)))
        return self

    def frame(self, frame_id: int, data: bytes | None = IMAGE) -> Feed:
        image = None if data is None else pb.Image(data=data)
        self.put(pb.WatchRequest(frame=pb.Frame(frame_id=frame_id, image=image)))
        return self

    def end(self) -> Feed:
        self._queue.put_nowait(None)
        return self

    async def __aiter__(self):
        while (message := await self._queue.get()) is not None:
            yield message


class Answers:
    """A Watch stream's messages, grouped by frame, with the check that one frame's messages are never
    interleaved with another's."""

    def __init__(self, messages):
        self.messages = messages
        self.frames: list[int] = []  # frames in the order their messages came
        for message in messages:
            if not self.frames or self.frames[-1] != message.frame_id:
                assert message.frame_id not in self.frames, f"frame {message.frame_id}'s messages are interleaved"
                self.frames.append(message.frame_id)

    def of(self, frame_id: int):
        return [m for m in self.messages if m.frame_id == frame_id]

    def text(self, frame_id: int) -> str:
        return "".join(m.text for m in self.of(frame_id))

    def last(self, frame_id: int):
        return self.of(frame_id)[-1]

    def answered(self) -> list[int]:
        return [m.frame_id for m in self.messages if m.finish_reason]

    def errors(self) -> dict[int, object]:
        return {m.frame_id: m.error for m in self.messages if m.HasField("error")}


async def until(condition, message: str = "the condition never held", timeout: float = 10.0) -> None:
    """Wait (on the event loop) until a server-side condition holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, message
        await asyncio.sleep(0.001)


def received(engine) -> float:
    return sample(engine, "vlm_watch_frames_received_total", model="fake")


def outcomes(engine) -> dict[str, float]:
    return {o: sample(engine, "vlm_watch_frames_total", model="fake", outcome=o) for o in OUTCOMES}


def violation(status) -> str:
    """The field of the BadRequest detail in a google.rpc.Status."""
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            return bad_request.field_violations[0].field
    raise AssertionError("no BadRequest detail")


async def test_latest_answers_the_current_frame_to_its_end_then_only_the_newest(servicer, engine):
    scheduler = engine.models["fake"].scheduler
    backend = fakes.FakeBackend.instances[-1]
    with StepGate(scheduler, closed=True) as gate:
        feed = Feed().config().frame(1)
        stream = asyncio.ensure_future(collect(servicer.Watch(feed, FakeContext())))
        await asyncio.to_thread(gate.wait_held)  # frame 1's answer is held at its first stop check
        for frame_id in (2, 3, 4, 5):
            feed.frame(frame_id)
        await until(lambda: received(engine) == 5, "the frames were not all read while an answer was held")
        assert outcomes(engine)["skipped"] == 3, "a newer frame replaces the one waiting: one waits at most"
        feed.end()
        gate.open()
        answers = Answers(await stream)
    assert answers.frames == [1, 5]
    for frame_id in (1, 5):
        assert answers.text(frame_id) == FULL
        assert answers.last(frame_id).finish_reason == pb.FINISH_REASON_STOP
    assert answers.last(1).frames_skipped == 0
    assert answers.last(5).frames_skipped == 3
    assert len(backend.started) == 2, "skipped frames never reach the model"
    assert outcomes(engine) == {"answered": 2, "interrupted": 0, "skipped": 3, "rejected": 0, "unanswered": 0}
    assert engine.open_streams == 0


async def test_interrupt_stops_the_answer_at_its_next_step_and_answers_the_newer_frame(servicer, engine):
    scheduler = engine.models["fake"].scheduler
    # Hold frame 1's answer at its second stop check: it has written "Hello".
    with StepGate(scheduler, hold_when=lambda job: gate.steps_of(job) == 2) as gate:
        feed = Feed().config(policy=pb.WATCH_POLICY_INTERRUPT).frame(1)
        stream = asyncio.ensure_future(collect(servicer.Watch(feed, FakeContext())))
        first = await asyncio.to_thread(gate.wait_held)
        feed.frame(2)
        await until(lambda: first.interrupted, "the newer frame never interrupted the answer")
        checks = gate.steps_of(first)
        feed.end()
        gate.open()
        answers = Answers(await stream)
        # The stop check that was held when the newer frame came is the one that stopped the answer:
        # not one decode step more.
        assert gate.steps_of(first) == checks == 2
    assert answers.frames == [1, 2]
    assert answers.text(1) == "Hello"
    last = answers.last(1)
    assert last.finish_reason == pb.FINISH_REASON_INTERRUPTED
    assert last.usage.completion_tokens == 1
    assert answers.text(2) == FULL and answers.last(2).finish_reason == pb.FINISH_REASON_STOP
    assert outcomes(engine)["interrupted"] == 1 and outcomes(engine)["answered"] == 1
    assert sample(engine, "vlm_finish_reasons_total", model="fake", reason="interrupted") == 1


async def test_a_decoded_frame_replaced_before_its_turn_is_skipped_and_its_queued_answer_never_runs(servicer, engine):
    scheduler = engine.models["fake"].scheduler
    backend = fakes.FakeBackend.instances[-1]
    with StepGate(scheduler, hold_when=lambda job: gate.steps_of(job) == 2) as gate:
        feed = Feed().config(policy=pb.WATCH_POLICY_INTERRUPT).frame(1)
        stream = asyncio.ensure_future(collect(servicer.Watch(feed, FakeContext())))
        first = await asyncio.to_thread(gate.wait_held)  # frame 1's answer is held after "Hello"
        feed.frame(2)
        await until(lambda: first.interrupted and scheduler.queue_depth == 1, "frame 2's answer never queued")
        feed.frame(3)  # decoded while frame 2's answer still waits its turn: frame 2 is skipped
        await until(lambda: outcomes(engine)["skipped"] == 1 and scheduler.queue_depth == 1)
        feed.end()
        gate.open()
        answers = Answers(await stream)
    assert answers.frames == [1, 3]
    assert answers.last(1).finish_reason == pb.FINISH_REASON_INTERRUPTED
    assert answers.text(3) == FULL and answers.last(3).frames_skipped == 1
    assert len(backend.started) == 2, "frame 2's answer never ran"
    assert outcomes(engine) == {"answered": 1, "interrupted": 1, "skipped": 1, "rejected": 0, "unanswered": 0}


async def test_interrupting_a_queued_answer_ends_it_at_once_without_running_it(servicer, engine):
    scheduler = engine.models["fake"].scheduler
    backend = fakes.FakeBackend.instances[-1]
    with StepGate(scheduler, closed=True) as gate:
        caption = asyncio.ensure_future(collect(servicer.Caption(caption_request(), FakeContext())))
        await asyncio.to_thread(gate.wait_held)  # the Caption holds the model; frame 1's answer must queue
        feed = Feed().config(policy=pb.WATCH_POLICY_INTERRUPT).frame(1)
        stream = asyncio.ensure_future(collect(servicer.Watch(feed, FakeContext())))
        await until(lambda: scheduler.queue_depth == 1, "frame 1's answer never queued")
        feed.frame(2)
        await until(lambda: scheduler.queue_depth == 1 and outcomes(engine)["interrupted"] == 1)
        assert len(backend.started) == 1, "the interrupted answer left the queue while the model was held"
        feed.end()
        gate.open()
        answers = Answers(await stream)
        await caption
    assert answers.frames == [1, 2]
    assert answers.text(1) == "" and answers.last(1).finish_reason == pb.FINISH_REASON_INTERRUPTED
    assert answers.last(1).usage.completion_tokens == 0
    assert answers.text(2) == FULL
    assert len(backend.started) == 2, "frame 1's answer never ran"


async def test_bad_frames_get_one_error_message_each_and_the_stream_goes_on(servicer, engine):
    feed = Feed().config()
    stream = asyncio.ensure_future(collect(servicer.Watch(feed, FakeContext())))
    feed.frame(1, b"GIF89a-broken")
    await until(lambda: outcomes(engine)["rejected"] == 1)
    feed.frame(2)
    await until(lambda: outcomes(engine)["answered"] == 1)
    feed.frame(2)  # not greater than the previous id
    feed.frame(3, None)  # no image
    feed.frame(4, b"")  # an empty image
    # (A frame that is replaced before its turn is skipped and never decoded: frame 5 waits until frame 4
    # has been decoded and refused.)
    await until(lambda: outcomes(engine)["rejected"] == 4)
    feed.frame(5)
    feed.end()
    answers = Answers(await stream)
    errors = answers.errors()
    assert set(errors) == {1, 2, 3, 4}
    assert all(e.code == code_pb2.INVALID_ARGUMENT for e in errors.values())
    assert violation(errors[1]) == "frame.image.data"
    assert violation(errors[2]) == "frame.frame_id" and "must increase" in errors[2].message
    assert violation(errors[3]) == "frame.image"
    assert violation(errors[4]) == "frame.image.data"
    for frame_id in (1, 3, 4):
        assert len(answers.of(frame_id)) == 1, "a rejected frame gets exactly one message"
    assert answers.text(2) == FULL and answers.text(5) == FULL
    assert answers.answered() == [2, 5]
    assert outcomes(engine)["rejected"] == 4 and received(engine) == 6


async def test_a_refused_frame_tells_the_frames_it_replaced(servicer, engine):
    scheduler = engine.models["fake"].scheduler
    with StepGate(scheduler, closed=True) as gate:
        feed = Feed().config().frame(1)
        stream = asyncio.ensure_future(collect(servicer.Watch(feed, FakeContext())))
        await asyncio.to_thread(gate.wait_held)
        feed.frame(2).frame(3, b"GIF89a-broken").end()  # frame 3 replaces frame 2, then is refused
        await until(lambda: received(engine) == 3)
        gate.open()
        answers = Answers(await stream)
    assert answers.answered() == [1] and set(answers.errors()) == {3}
    assert answers.last(3).frames_skipped == 1
    sent = 3
    assert len(answers.frames) + sum(m.frames_skipped for m in answers.messages) == sent


async def test_a_flood_of_refused_frames_unread_stops_the_reading_of_frames(servicer, engine):
    """Error messages that wait for a client that does not read are bounded: the stream stops taking
    frames (gRPC's flow control then holds the sender) until they are sent."""
    from vlm_service.api import watch

    feed = Feed().config()
    for frame_id in range(200):
        feed.frame(frame_id, None)  # each refused: no image
    feed.end()
    stream = servicer.Watch(feed, FakeContext())
    first = await anext(stream)  # the client reads one message, then nothing
    await until(lambda: received(engine) == watch._REJECTIONS_WAITING)
    for _ in range(200):  # the event loop's turns, not wall time: the feed is in memory, so a reader
        await asyncio.sleep(0)  # that could take more frames would have taken them by now
    assert received(engine) == watch._REJECTIONS_WAITING
    rest = await collect(stream)  # the client reads again: every frame gets its message
    assert [m.frame_id for m in [first, *rest]] == list(range(200))
    assert all(m.HasField("error") for m in rest)


async def test_half_close_finishes_the_current_answer_and_the_newest_waiting_frame(servicer, engine):
    scheduler = engine.models["fake"].scheduler
    with StepGate(scheduler, closed=True) as gate:
        feed = Feed().config().frame(10)
        stream = asyncio.ensure_future(collect(servicer.Watch(feed, FakeContext())))
        await asyncio.to_thread(gate.wait_held)
        feed.frame(11).frame(12).end()  # half-closed while frame 10 is answered and 12 waits
        await until(lambda: received(engine) == 3)
        gate.open()
        answers = Answers(await stream)  # the stream ends by itself, with OK
    assert answers.answered() == [10, 12]
    assert answers.last(12).frames_skipped == 1
    assert answers.text(12) == FULL
    assert engine.open_streams == 0


@pytest.mark.parametrize(
    ("messages", "error", "field"),
    [
        ([], InvalidInput, "config"),
        ([pb.WatchRequest(frame=pb.Frame(frame_id=1))], InvalidInput, "config"),
        ([pb.WatchRequest()], InvalidInput, "config"),
        ([pb.WatchRequest(config=pb.WatchConfig(model="nope"))], ModelNotFound, None),
        (
            [pb.WatchRequest(config=pb.WatchConfig(options=pb.GenerationOptions(top_p=1.5)))],
            InvalidInput,
            "config.options.top_p",
        ),
        ([pb.WatchRequest(config=pb.WatchConfig(question=" " * 3, length=9))], InvalidInput, "config.length"),
        (
            [pb.WatchRequest(config=pb.WatchConfig(question="Why?", length=pb.CAPTION_LENGTH_SHORT))],
            InvalidInput,
            "config.length",
        ),
        ([pb.WatchRequest(config=pb.WatchConfig(question="x" * 5000))], InvalidInput, "config.question"),
        ([pb.WatchRequest(config=pb.WatchConfig(policy=7))], InvalidInput, "config.policy"),
        ([pb.WatchRequest(config=pb.WatchConfig(response_language="tlh"))], InvalidInput, "config.response_language"),
        (
            [pb.WatchRequest(config=pb.WatchConfig()), pb.WatchRequest(config=pb.WatchConfig())],
            InvalidInput,
            "config",
        ),
    ],
)
async def test_a_bad_or_missing_config_ends_the_stream(servicer, engine, messages, error, field):
    with pytest.raises(error) as info:
        await collect(servicer.Watch(Feed(*messages).end(), FakeContext()))
    if field is not None:
        assert info.value.violations[0].field == field
    assert engine.open_streams == 0


async def test_a_message_with_neither_config_nor_frame_after_the_config_ends_the_stream(servicer, engine):
    feed = Feed().config().frame(1)
    feed.put(pb.WatchRequest())
    with pytest.raises(InvalidInput) as info:
        await collect(servicer.Watch(feed.end(), FakeContext()))
    assert info.value.violations[0].field == "frame"
    assert engine.open_streams == 0 and engine.idle


async def test_a_malformed_message_ends_the_stream_with_invalid_argument(servicer, engine):
    """The interceptor turns a message that does not parse into MalformedMessage where it is read."""
    from vlm_service.api.interceptors import _checked_messages, _Malformed

    feed = Feed().config()
    feed.put(_Malformed())
    with pytest.raises(MalformedMessage, match="message 2 of the request stream"):
        await collect(servicer.Watch(_checked_messages(feed.end()), FakeContext()))


async def test_a_watch_stream_holds_one_stream_slot_for_its_life(servicer, engine):
    engine.settings.max_streams = 1
    feed = Feed().config()
    context = FakeContext()
    stream = asyncio.ensure_future(collect(servicer.Watch(feed, context)))
    await until(lambda: context.initial_metadata is not None)
    assert engine.open_streams == 1, "between frames the stream still holds its slot"
    with pytest.raises(QueueFull):
        await collect(servicer.Caption(caption_request(), FakeContext()))
    feed.frame(1).frame(2)  # its answers count under its own slot
    await until(lambda: outcomes(engine)["answered"] >= 1)
    assert engine.open_streams == 1
    feed.end()
    await stream
    assert engine.open_streams == 0


async def test_a_drain_ends_an_open_watch_stream_with_unavailable_at_its_next_frame(servicer, engine):
    feed = Feed().config().frame(1)
    stream = asyncio.ensure_future(collect(servicer.Watch(feed, FakeContext())))
    await until(lambda: outcomes(engine)["answered"] == 1)
    engine.start_draining()
    feed.frame(2)
    with pytest.raises(ShuttingDown):
        await stream
    assert engine.open_streams == 0
    assert outcomes(engine)["unanswered"] == 1 and received(engine) == 2


async def test_the_rpcs_end_stops_the_answer_and_counts_what_was_left(servicer, engine):
    """Cancel, deadline or disconnect: grpc runs the RPC's done callbacks; the answer stops at once."""
    scheduler = engine.models["fake"].scheduler
    with StepGate(scheduler, closed=True) as gate:
        feed = Feed().config().frame(1)
        context = FakeContext()
        stream = asyncio.ensure_future(collect(servicer.Watch(feed, context)))
        job = await asyncio.to_thread(gate.wait_held)
        feed.frame(2)
        await until(lambda: received(engine) == 2)
        for callback in context.done_callbacks:  # what grpc does when the RPC ends
            callback(context)
        assert job.cancelled and engine.open_streams == 0
        stream.cancel()
        gate.open()
    with pytest.raises(asyncio.CancelledError):
        await stream
    await until(lambda: engine.idle)
    assert outcomes(engine)["unanswered"] == 2, "the running answer and the waiting frame"


async def test_identical_frames_reuse_the_image_cache_and_decoding_stays_off_the_event_loop(
    servicer, engine, monkeypatch
):
    threads = []
    original = image_decoding.decode_in_pool

    def recording(*args, **kwargs):
        threads.append(threading.current_thread())
        return original(*args, **kwargs)

    monkeypatch.setattr(image_decoding, "decode_in_pool", recording)
    seen = []
    scheduler = engine.models["fake"].scheduler
    scheduler.step_gate = lambda job: seen.append(job.request.image_digest)
    feed = Feed().config()
    stream = asyncio.ensure_future(collect(servicer.Watch(feed, FakeContext())))
    for frame_id in (1, 2):
        feed.frame(frame_id)
        await until(lambda n=frame_id: outcomes(engine)["answered"] == n)
    feed.end()
    await stream
    assert len(threads) == 2 and threading.main_thread() not in threads
    assert all(thread.name.startswith("vlm-decode") for thread in threads)
    assert len(set(seen)) == 1 and seen[0], "identical frames carry one image-cache key"


async def test_the_access_line_sums_the_answers_tokens(servicer, engine):
    from vlm_service.observability import access

    call = access.Call("/vlm.v1.VisionLanguageService/Watch", "watch-1", "", 0.0)
    token = access._current.set(call)
    try:
        feed = Feed().config(question="What is it?")
        stream = asyncio.ensure_future(collect(servicer.Watch(feed, FakeContext())))
        feed.frame(1)
        await until(lambda: outcomes(engine)["answered"] == 1)
        feed.frame(2).end()
        answers = Answers(await stream)
    finally:
        access._current.reset(token)
    assert answers.answered() == [1, 2]
    assert call.completion_tokens == 10 and call.prompt_tokens == 14 and call.first_text_at is not None
    assert sample(engine, "vlm_requests_total", method="Watch", code="OK") == 1


def test_frame_errors_carry_grpc_codes():
    """A frame's error message carries the status a Caption would have ended with, rich details included."""
    from vlm_service.api.status import to_rpc_status

    status = to_rpc_status(QueueFull("the queue is full", retry_after=2.0))
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert status.details[0].Is(error_details_pb2.RetryInfo.DESCRIPTOR)
