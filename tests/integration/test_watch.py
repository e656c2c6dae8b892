"""Watch on a real server with the tiny SmolVLM (and its random-weights twin `noise` for answers that
must run long), driven by the Python client (sync and asyncio).

Which frames are answered, skipped or interrupted is decided by server-side events (a step gate holding
the scheduler, the scheduler's stop checks), never by timing; nothing here asserts a wall-clock time (the
timing goals are measured by `make bench-watch`)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue

import pytest

from tests.helpers import (
    StepGate,
    caption_request,
    held_until_stopped,
    query_request,
    run_rpc,
    sample,
    shape_image,
    steps_with_more_rows_than,
    wait_for,
    wait_idle,
)
from vlm.v1 import vlm_service_pb2 as pb
from vlm_client import AsyncVLMClient, DeadlineExceeded, InvalidArgument, VLMClient
from vlm_service.api.watch import OUTCOMES

QUESTION = "What colour is the shape?"
PICTURES = [
    shape_image(colour, size=size)
    for colour, size in [
        ("red", (96, 64)),
        ("blue", (64, 64)),
        ("green", (120, 80)),
        ("yellow", (80, 120)),
        ("purple", (100, 100)),
        ("orange", (96, 64)),
        ("black", (64, 96)),
        ("red", (150, 48)),
    ]
]


class Frames:
    """A feed the test sends frames into, one at a time; the client reads it in gRPC's sending thread."""

    def __init__(self):
        self._queue: queue.Queue = queue.Queue()

    def send(self, frame_id: int, image) -> None:
        self._queue.put((frame_id, image))

    def end(self) -> None:
        self._queue.put(None)

    def __iter__(self):
        while (item := self._queue.get(timeout=120)) is not None:
            yield item


def read_all(stream) -> list:
    """Every answer of a Watch stream: (frame_id, text, finish_reason, frames_skipped, error)."""
    return [(a.frame_id, a.result(), a.finish_reason, a.frames_skipped, a.error) for a in stream]


def frames_counted(engine, model: str) -> dict[str, float]:
    counts = {o: sample(engine, "vlm_watch_frames_total", model=model, outcome=o) for o in OUTCOMES}
    counts["received"] = sample(engine, "vlm_watch_frames_received_total", model=model)
    return counts


def test_two_watch_streams_and_captions_at_once_each_answer_equals_the_same_request_alone(smolvlm_server):
    """A LATEST stream of captions and an INTERRUPT stream of questions, beside two Captions, start in one
    decode batch (the scheduler is held until all four wait), then go on with more frames. Every answer that
    ran to its end is the same text as the same request alone (greedy); an interrupted one is a prefix."""
    server, model = smolvlm_server, "tiny-smolvlm"
    engine = server.engine
    scheduler = engine.models[model].scheduler
    wait_idle(engine)
    shared_steps = steps_with_more_rows_than(engine, model, 1)
    latest, interrupt = Frames(), Frames()
    with VLMClient(server.target) as client, concurrent.futures.ThreadPoolExecutor(4) as pool:
        captions_stream = client.watch(latest, length="short")
        questions_stream = client.watch(interrupt, QUESTION, policy="interrupt")
        with StepGate(scheduler, closed=True) as gate:
            answers = [pool.submit(read_all, captions_stream), pool.submit(read_all, questions_stream)]
            latest.send(0, PICTURES[0])
            interrupt.send(0, PICTURES[1])
            captions = [pool.submit(run_rpc, server, caption_request(PICTURES[k])) for k in (2, 3)]
            gate.wait_held()
            wait_for(
                lambda: scheduler.running + scheduler.queue_depth == 4, message="the four requests never all waited"
            )
        for frame_id in range(1, 6):
            latest.send(frame_id, PICTURES[(frame_id + 3) % 8])
            interrupt.send(frame_id, PICTURES[(frame_id + 5) % 8])
        latest.end()
        interrupt.end()
        captions_answers, questions_answers = (future.result(timeout=300) for future in answers)
        captions_alone = [future.result(timeout=300) for future in captions]
    assert steps_with_more_rows_than(engine, model, 1) > shared_steps, "the answers never shared a decode step"

    def alone(request) -> str:
        return run_rpc(server, request)[0]

    assert captions_answers[0][0] == 0 and questions_answers[0][0] == 0
    assert captions_answers[-1][0] == 5, "the last frame is always answered"
    for frame_id, text, reason, _, error in captions_answers:
        assert error is None and reason != "interrupted"
        picture = PICTURES[0] if frame_id == 0 else PICTURES[(frame_id + 3) % 8]
        assert text == alone(caption_request(picture, length=pb.CAPTION_LENGTH_SHORT)), f"caption of frame {frame_id}"
    assert questions_answers[-1][0] == 5 and questions_answers[-1][2] != "interrupted"
    for frame_id, text, reason, _, error in questions_answers:
        assert error is None
        picture = PICTURES[1] if frame_id == 0 else PICTURES[(frame_id + 5) % 8]
        expected = alone(query_request(QUESTION, picture))
        if reason == "interrupted":
            assert expected.startswith(text), f"interrupted answer of frame {frame_id}"
        else:
            assert text == expected, f"answer of frame {frame_id}"
    for k, (text, _) in zip((2, 3), captions_alone, strict=True):
        assert text == alone(caption_request(PICTURES[k]))
    # Every frame is accounted for: answered (to its end or interrupted) or counted as skipped.
    for stream in (captions_answers, questions_answers):
        assert len(stream) + sum(skipped for _, _, _, skipped, _ in stream) == 6


def test_interrupt_stops_the_old_answer_at_its_next_decode_step(smolvlm_server):
    """Every stop check of the old answer is recorded with whether the interrupt had come: the first
    check that saw it is its last (the step that was running may finish, no other)."""
    server = smolvlm_server
    scheduler = server.engine.models["noise"].scheduler
    wait_idle(server.engine)
    checks = []
    scheduler.step_gate = lambda job: checks.append((job, job.interrupted))
    frames = Frames()
    try:
        with VLMClient(server.target) as client:
            stream = client.watch(frames, policy="interrupt", model="noise", max_new_tokens=1500)
            answers = iter(stream)
            frames.send(0, PICTURES[0])
            old = next(answers)
            text = iter(old)
            next(text), next(text)  # the old answer is streaming
            frames.send(1, PICTURES[1])
            list(text)
            new = next(answers)
            next(iter(new))  # the newer frame's answer streams
            stream.cancel()
    finally:
        scheduler.step_gate = None
    wait_idle(server.engine)
    assert old.frame_id == 0 and old.finish_reason == "interrupted"
    assert 2 <= old.usage.completion_tokens < 1500
    first_job = checks[0][0]
    seen = [interrupted for job, interrupted in checks if job is first_job]
    assert seen.count(True) == 1 and seen[-1], f"stop checks after the interrupt: {seen.count(True)}"
    assert new.frame_id == 1 and any(job is not first_job for job, _ in checks)


def test_latest_skips_the_frames_that_came_during_an_answer_and_reuses_the_image_cache(smolvlm_server):
    server, model = smolvlm_server, "tiny-smolvlm"
    engine = server.engine
    served = engine.models[model]
    wait_idle(engine)
    before = frames_counted(engine, model)
    hits = sample(engine, "vlm_image_cache_hits_total", model=model, kind="features")
    frames = Frames()
    with VLMClient(server.target) as client, concurrent.futures.ThreadPoolExecutor(1) as pool:
        stream = client.watch(frames, QUESTION)
        with StepGate(served.scheduler, closed=True) as gate:
            answers = pool.submit(read_all, stream)
            frames.send(1, PICTURES[2])
            gate.wait_held()  # frame 1's answer is held; five more frames come
            for frame_id in range(2, 7):
                frames.send(frame_id, PICTURES[2])  # the same picture: its vision work is cached
            wait_for(lambda: frames_counted(engine, model)["received"] - before["received"] == 6)
            frames.end()
        answers = answers.result(timeout=300)
    expected = run_rpc(server, query_request(QUESTION, PICTURES[2]))[0]
    assert [(a[0], a[1], a[3]) for a in answers] == [(1, expected, 0), (6, expected, 4)]
    after = frames_counted(engine, model)
    delta = {key: after[key] - before[key] for key in after}
    assert delta == {"answered": 2, "interrupted": 0, "skipped": 4, "rejected": 0, "unanswered": 0, "received": 6}
    assert sample(engine, "vlm_image_cache_hits_total", model=model, kind="features") > hits
    assert sample(engine, "vlm_requests_total", method="Watch", code="OK") >= 1


def test_cancelling_a_watch_stream_stops_its_answer(smolvlm_server):
    """As for Caption: counted from the server's side of the cancel, the running step may finish, no other."""
    server = smolvlm_server
    engine = server.engine
    served = engine.models["noise"]
    wait_idle(engine)
    frames = Frames()
    with VLMClient(server.target) as client, StepGate(served.scheduler, served.backend.model) as gate:
        stream = client.watch(frames, model="noise", max_new_tokens=2000)
        frames.send(0, PICTURES[0])
        answers = iter(stream)  # (kept: an iteration that ends, collected, cancels the call)
        answer = next(answers)
        for chunks, _ in enumerate(answer, start=1):
            if chunks == 3:
                gate.close()
                stream.cancel()
                break
        at_cancel, steps = held_until_stopped(engine, gate)
    assert steps - at_cancel <= 1, f"{steps - at_cancel} decode steps ran after the server had the cancel"
    wait_for(lambda: engine.open_streams == 0, message="the stream's slot was never given back")


def test_a_watch_streams_deadline_ends_it_and_its_answer(smolvlm_server):
    server = smolvlm_server
    engine = server.engine
    served = engine.models["noise"]
    wait_idle(engine)
    frames = Frames()
    with VLMClient(server.target) as client, StepGate(served.scheduler, served.backend.model) as gate:
        gate.hold_when = lambda job: gate.steps_of(job) >= 5
        stream = client.watch(frames, model="noise", max_new_tokens=2000, timeout=1.0)
        frames.send(0, PICTURES[0])
        with pytest.raises(DeadlineExceeded):
            read_all(stream)
        at_deadline, steps = held_until_stopped(engine, gate)
    frames.end()
    assert steps - at_deadline <= 1
    wait_for(lambda: engine.open_streams == 0, message="the stream's slot was never given back")


def test_the_async_client_streams_each_frames_answer_and_reports_bad_frames(smolvlm_server):
    async def feed():
        yield PICTURES[0]
        yield b"not an image"

    async def main():
        async with AsyncVLMClient(smolvlm_server.target) as client:
            answers = []
            async for answer in client.watch(feed(), QUESTION):
                chunks = [text async for text in answer]
                answers.append((answer.frame_id, "".join(chunks), answer.finish_reason, answer.error))
            with pytest.raises(InvalidArgument) as info:
                async for _ in client.watch([PICTURES[0]], QUESTION, temperature=-1):
                    pass
            return answers, info.value

    (first, second), error = asyncio.run(main())
    assert first[:3] == (0, run_rpc(smolvlm_server, query_request(QUESTION, PICTURES[0]))[0], "stop")
    assert second[0] == 1 and second[1] == "" and isinstance(second[3], InvalidArgument)
    assert second[3].field_violations[0].field == "frame.image.data"
    assert error.field_violations[0].field == "config.options.temperature"
