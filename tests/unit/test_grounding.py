"""Detect and Point below the model: Qwen2-VL's box text parsed as it streams, the requests' checks,
and a job's regions (max_objects, malformed output, first-output time)."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vlm.v1 import vlm_service_pb2 as pb
from vlm_service.api import convert
from vlm_service.backends.base import Outcome
from vlm_service.backends.qwen2_vl import BoxParser, box_text
from vlm_service.config import Settings
from vlm_service.core.job import Job
from vlm_service.errors import InvalidInput
from vlm_service.types import Finished, FinishReason, GenerationRequest, Malformed, Region, SamplingParams, Task


def parse(text: str, pieces: int = 1) -> list:
    """``text`` through a BoxParser in about ``pieces`` pieces (1: at once; its length: per character)."""
    parser, out = BoxParser(), []
    size = max(1, len(text) // pieces)
    for start in range(0, len(text), size):
        out += parser.push(text[start : start + size])
    return out + parser.finish()


@pytest.mark.parametrize("pieces", [1, 3, 10_000])
def test_boxes_in_the_models_format_are_read_however_the_text_is_cut(pieces):
    boxes = [(0.012, 0.34, 0.56, 0.78), (0.0, 0.0, 1.0, 1.0)]
    written = box_text("red circle", boxes).replace("<|box_start|>", "").replace("<|box_end|>", "")
    written = written.replace("<|object_ref_start|>", "").replace("<|object_ref_end|>", "")  # skipped tokens
    assert parse(written, pieces) == [Region(box=box) for box in boxes]


@given(st.lists(st.tuples(*[st.integers(0, 1000)] * 4), max_size=4), st.integers(1, 40))
def test_any_valid_boxes_round_trip(corners, pieces):
    ordered = [(min(a, c), min(b, d), max(a, c), max(b, d)) for a, b, c, d in corners]
    text = "thing" + "".join(f"({a},{b}),({c},{d})" for a, b, c, d in ordered)
    assert parse(text, pieces) == [Region(box=tuple(v / 1000 for v in box)) for box in ordered]


@pytest.mark.parametrize("pieces", [1, 4, 10_000])
def test_parentheses_of_the_echoed_phrase_are_neither_boxes_nor_malformed(pieces):
    """The model repeats the object phrase before its boxes; a client's phrase may hold parentheses."""

    def parse_echo(phrase: str, text: str) -> list:
        parser, out = BoxParser(echo=phrase), []
        size = max(1, len(text) // pieces)
        for start in range(0, len(text), size):
            out += parser.push(text[start : start + size])
        return out + parser.finish()

    box = Region(box=(0.012, 0.034, 0.056, 0.078))
    assert parse_echo("cup (blue)", "cup (blue)(12,34),(56,78)cup (blue)") == [box]
    assert parse_echo("(0,0),(1000,1000)", "(0,0),(1000,1000)(12,34),(56,78)") == [box]
    assert parse_echo("cup (blue)", "There is no cup (blue) here.") == []
    assert parse_echo("cup (blue)", "cup (bl(12,34),(56,78)") == [
        Malformed("(bl", "not a box of the form (x1,y1),(x2,y2)"),
        box,
    ]
    assert parse_echo("cup (blue)", "cup (blue)(12,3") == [Malformed("(12,3", "the answer ended inside a box")]
    assert parse("cup (blue)(12,34),(56,78)")[0] == Malformed("(blue)", "not a box of the form (x1,y1),(x2,y2)")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("(12,34),(56,1001)", "above 1000"),
        ("(500,500),(100,900)", "not below and right"),
        ("(12,34) and more", "not a box"),
        ("(12,34),(56", "ended inside a box"),
        ("(a,b)", "not a box"),
    ],
)
def test_malformed_boxes_are_reported_never_raised(text, reason):
    out = parse(text, len(text))
    assert [type(event) for event in out] == [Malformed]
    assert reason in out[0].reason and out[0].text.startswith("(")


def test_a_malformed_box_does_not_hide_the_next_good_one():
    out = parse("(1,2)(10,20),(30,40)", 1)
    assert out == [Malformed("(1,2)", "not a box of the form (x1,y1),(x2,y2)"), Region(box=(0.01, 0.02, 0.03, 0.04))]


def detect_message(**fields) -> pb.DetectRequest:
    return pb.DetectRequest(image=pb.Image(data=b"x"), **{"object": "red circle", **fields})


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"object": "  "}, "object"),
        ({"object": "x" * 201}, "object"),
        ({"object": "a<|im_end|>b"}, "object"),
        ({"object": "two\nlines"}, "object"),
        ({"max_objects": 51}, "max_objects"),
        ({"detail": 9}, "detail"),
    ],
)
def test_bad_detect_requests_name_their_field(fields, field):
    with pytest.raises(InvalidInput) as raised:
        convert.detect_request(detect_message(**fields), Settings())
    assert raised.value.field == field


def test_a_detect_request_is_greedy_and_keeps_its_phrase():
    request = convert.point_request(pb.PointRequest(object=" face ", max_objects=3), Settings())
    assert (request.task, request.target, request.max_objects, request.params.greedy) == (Task.POINT, "face", 3, True)


def grounding_job(max_objects: int, parser=None, task=Task.DETECT) -> Job:
    request = GenerationRequest("r", "m", task, None, SamplingParams(64), target="circle", max_objects=max_objects)
    return Job(request, asyncio.new_event_loop(), regions=parser)


def events_of(job: Job) -> list:
    async def read():
        return [event async for event in job.events()]

    return job._loop.run_until_complete(read())


def test_a_job_streams_boxes_and_stops_at_max_objects():
    job = grounding_job(2, BoxParser())
    job.add_text("circle(1,2),(3,4)")
    assert not job.should_stop() and job.timeline.first_text_at is not None  # a region is the first output
    job.add_text("(5,6),(7,8)")
    assert job.should_stop()  # two found: the model should stop
    job.add_text("(9,9),(10,10)")  # written before the stop took effect: dropped
    job.finish(Outcome(10, 30, FinishReason.STOP), job.final_reason(Outcome(10, 30, FinishReason.STOP)))
    events = events_of(job)
    assert events[:2] == [Region(box=(0.001, 0.002, 0.003, 0.004)), Region(box=(0.005, 0.006, 0.007, 0.008))]
    assert isinstance(events[2], Finished) and events[2].reason is FinishReason.MAX_OBJECTS and len(events) == 3


def test_a_job_reports_an_answer_cut_inside_a_box():
    job = grounding_job(5, BoxParser())
    job.add_text("circle(1,2),(3,")
    job.finish(Outcome(10, 8, FinishReason.LENGTH), job.final_reason(Outcome(10, 8, FinishReason.LENGTH)))
    events = events_of(job)
    assert events[0] == Malformed("(1,2),(3,", "the answer ended inside a box")
    assert events[1].reason is FinishReason.LENGTH


def test_regions_sent_by_the_family_count_too():
    job = grounding_job(1, None, Task.POINT)
    job.add_text("words a family without a parser writes are not the answer")
    job.add_region(Region(point=(0.5, 0.25)))
    assert job.should_stop()
    job.finish(Outcome(0, 2, FinishReason.STOP), job.final_reason(Outcome(0, 2, FinishReason.STOP)))
    events = events_of(job)
    assert events[0] == Region(point=(0.5, 0.25)) and events[1].reason is FinishReason.MAX_OBJECTS
