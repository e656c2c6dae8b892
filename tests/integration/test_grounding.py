"""Detect, Point and Queries about several pictures, end to end: a real server with the tiny
families (Qwen2-VL's boxes parsed from its text; Moondream's through the twin of its published
``detect``/``point`` code), the Python client and the CLI."""

from __future__ import annotations

import io
import random
import threading

import grpc
import pytest
from PIL import Image

from tests.helpers import png_bytes, query_request, run_as_one_batch, shape_image, wait_idle
from vlm.v1 import vlm_service_pb2 as pb
from vlm_checkpoints import shapes
from vlm_client import Box, FailedPrecondition, InvalidArgument, Point, VLMClient
from vlm_client import cli as client_cli

DETECTORS = ["tiny-qwen2-vl", "tiny-moondream"]
#: Held-out pictures: a seed training never draws from.
HELD_OUT = 20260


@pytest.fixture
def stub(families_server):
    with families_server.channel() as channel:
        yield families_server.stub(channel)


def placed(count: int, seed: int = HELD_OUT) -> list[tuple[shapes.Scene, Image.Image, tuple]]:
    rng = random.Random(seed)
    return [(scene, *shapes.draw_placed(scene, rng)) for scene in shapes.scenes(rng, count)]


def detect(stub, model: str, image: Image.Image | bytes, target: str, **fields) -> list[pb.DetectResponse]:
    data = image if isinstance(image, bytes) else png_bytes(image)
    return list(stub.Detect(pb.DetectRequest(model=model, image=pb.Image(data=data), object=target, **fields)))


def boxes_of(messages) -> list[tuple[float, float, float, float]]:
    return [(m.box.x_min, m.box.y_min, m.box.x_max, m.box.y_max) for m in messages if m.HasField("box")]


def test_list_models_says_which_models_ground_and_how_many_pictures_each_takes(stub):
    infos = {info.name: info for info in stub.ListModels(pb.ListModelsRequest()).models}
    assert (infos["tiny-smolvlm"].detects, infos["tiny-smolvlm"].points) == (False, False)
    assert (infos["tiny-qwen2-vl"].detects, infos["tiny-qwen2-vl"].points) == (True, False)
    assert (infos["tiny-moondream"].detects, infos["tiny-moondream"].points) == (True, True)
    assert infos["tiny-moondream"].max_images == 1
    assert infos["tiny-smolvlm"].max_images == infos["tiny-qwen2-vl"].max_images == 4  # the server's limit


@pytest.mark.parametrize("model", DETECTORS)
def test_detect_finds_the_shape_on_held_out_pictures(stub, model):
    """Like the colour accuracy: the tiny checkpoints learned where their shape is. A box counts when
    it overlaps the true one by half (IoU >= 0.5); a box fixed in the middle is the baseline to beat."""
    pictures = placed(16)
    hits = baseline = 0
    for scene, image, truth in pictures:
        messages = detect(stub, model, image, f"{scene.colour} {scene.shape}")
        found = boxes_of(messages)
        assert messages[-1].finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_MAX_OBJECTS)
        hits += bool(found) and shapes.iou(found[0], truth) >= 0.5
        baseline += shapes.iou((0.3, 0.3, 0.7, 0.7), truth) >= 0.5
    assert hits >= 12, f"{model}: {hits}/16 boxes overlap the shape by half (a fixed box: {baseline}/16)"
    assert hits >= baseline + 6


def test_point_lands_on_the_shape(stub):
    hits = 0
    for scene, image, (x0, y0, x1, y1) in placed(16):
        request = pb.PointRequest(model="tiny-moondream", image=pb.Image(data=png_bytes(image)), object=scene.shape)
        points = [(m.point.x, m.point.y) for m in stub.Point(request) if m.HasField("point")]
        hits += bool(points) and x0 <= points[0][0] <= x1 and y0 <= points[0][1] <= y1
    assert hits >= 12, f"{hits}/16 points on the shape"


@pytest.mark.parametrize("model", DETECTORS)
def test_each_box_leaves_the_server_before_the_generation_ends(families_server, stub, model):
    """The generation is held at its first stop check after a box was found, until the client has read
    that box: so the box was sent while the model was still running, not with the end."""
    served = families_server.engine.models[model]
    read = threading.Event()
    held = []

    def hold(job):
        if job.request.task.grounding and job._found and not held:
            held.append(read.wait(timeout=20))

    _, image, _ = next((s, i, b) for s, i, b in placed(16) if s.shape == "circle")
    wait_idle(families_server.engine)
    served.scheduler.step_gate = hold
    try:
        call = stub.Detect(pb.DetectRequest(model=model, image=pb.Image(data=png_bytes(image)), object="circle"))
        first = next(call)
        read.set()
        rest = list(call)
    finally:
        served.scheduler.step_gate = None
    assert first.HasField("box") and held == [True], "the box came with the end of the generation"
    assert rest[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED


def test_max_objects_stops_the_generation(stub):
    """One box asked: the model stops at it (Qwen2-VL would go on writing, the job stops it)."""
    _, image, _ = placed(1)[0]
    for model in DETECTORS:
        messages = detect(stub, model, image, "shape", max_objects=1)
        assert len(boxes_of(messages)) <= 1
        if boxes_of(messages):
            assert messages[-1].finish_reason == pb.FINISH_REASON_MAX_OBJECTS


@pytest.mark.parametrize("model", DETECTORS)
def test_boxes_are_relative_to_the_picture_after_its_exif_rotation(stub, model):
    """The stored pixels turned, with EXIF saying how to turn them back: the box is where it is on the
    picture as displayed (the first held-out square the model boxes right upright)."""
    upright, image = next(
        (found, i)
        for s, i, b in placed(16)
        if s.shape == "square"
        and (found := boxes_of(detect(stub, model, i, "square")))
        and shapes.iou(found[0], b) >= 0.5
    )
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": the stored pixels are turned the other way
    image.transpose(Image.Transpose.ROTATE_90).save(buffer, format="JPEG", quality=95, exif=exif)
    rotated = boxes_of(detect(stub, model, buffer.getvalue(), "square"))
    assert rotated and shapes.iou(rotated[0], upright[0]) >= 0.7, (rotated, upright)


def test_models_that_cannot_ground_are_failed_precondition_naming_the_model(stub):
    with pytest.raises(grpc.RpcError) as raised:
        detect(stub, "tiny-smolvlm", shape_image(), "circle")
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "'tiny-smolvlm'" in raised.value.details() and "tiny-qwen2-vl" in raised.value.details()
    with pytest.raises(grpc.RpcError) as raised:
        list(
            stub.Point(
                pb.PointRequest(model="tiny-qwen2-vl", image=pb.Image(data=png_bytes(shape_image())), object="x")
            )
        )
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "'tiny-qwen2-vl'" in raised.value.details()


def test_whatever_a_random_model_writes_a_detect_ends_cleanly(stub):
    """noise-qwen2-vl (random weights) writes anything: each message is a box, a malformed output or
    the end, and the RPC ends OK."""
    for seed in range(3):
        _, image, _ = placed(1, seed)[0]
        messages = detect(stub, "noise-qwen2-vl", image, "circle", max_objects=3)
        for message in messages[:-1]:
            assert message.HasField("box") != message.HasField("malformed")
            if message.HasField("box"):
                assert 0 <= message.box.x_min <= message.box.x_max <= 1
        assert messages[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED and messages[-1].HasField("usage")


def two_pictures(model: str, question: str = "What colour is the shape?", size=(96, 64), **fields) -> pb.QueryRequest:
    images = [pb.Image(data=png_bytes(shape_image(colour, size=size))) for colour in ("red", "blue")]
    return pb.QueryRequest(model=model, images=images, question=question, **fields)


@pytest.mark.parametrize("model", ["tiny-smolvlm", "tiny-qwen2-vl"])
def test_a_query_about_two_pictures_batched_equals_alone_and_caches_each_picture(families_server, stub, model):
    backend = families_server.engine.models[model].backend
    # Pictures no other test of the suite's shared server sends (sizes of their own): the red one is
    # not cached before this request.
    size = (83, 67)
    blue = shape_image("blue", size=size)
    blue_alone = query_request("What colour is the shape?", blue, model=model, max_new_tokens=24)
    "".join(m.text for m in stub.Query(blue_alone))
    hits = backend.images.stats()[0].get("features", 0)
    request = two_pictures(model, size=size, options=pb.GenerationOptions(max_new_tokens=24))
    alone = "".join(m.text for m in stub.Query(request))
    assert backend.images.stats()[0].get("features", 0) == hits + 1  # the blue picture's own entry
    other = two_pictures(model, "What shape is it?", size=size, options=request.options)
    together = run_as_one_batch(families_server, model, [request, blue_alone, other])
    assert together[0][0] == alone and alone


def test_pictures_beyond_what_a_model_or_the_server_takes_are_invalid_argument(stub):
    cases = [
        (two_pictures("tiny-moondream"), "takes one picture"),
        (pb.QueryRequest(model="tiny-qwen2-vl", question="?", images=[pb.Image(data=b"x")] * 5), "limit is 4"),
        (pb.QueryRequest(image=pb.Image(data=b"x"), images=[pb.Image(data=b"x")], question="?"), "not both"),
    ]
    for request, words in cases:
        with pytest.raises(grpc.RpcError) as raised:
            list(stub.Query(request))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in raised.value.details()
    bad = two_pictures("tiny-qwen2-vl")
    bad.images[1].data = b"not a picture"
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.Query(bad))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "images[1]" in raised.value.details()


def test_the_client_streams_boxes_and_points(families_server):
    scene, image, truth = next((s, i, b) for s, i, b in placed(16) if s.shape == "triangle")
    with VLMClient(families_server.target) as client:
        stream = client.detect(image, "triangle", model="tiny-moondream")
        found = list(stream)
        assert found and all(isinstance(box, Box) for box in found) and stream.finish_reason in ("stop", "max_objects")
        assert shapes.iou((found[0].x_min, found[0].y_min, found[0].x_max, found[0].y_max), truth) >= 0.5
        points = client.point(image, "triangle", model="tiny-moondream").result()
        assert points and isinstance(points[0], Point)
        with pytest.raises(FailedPrecondition):
            client.detect(image, "triangle", model="tiny-smolvlm").result()
        with pytest.raises(InvalidArgument):
            client.query([image, image], "Which?", model="tiny-moondream").result()
        assert client.query([image, shape_image("blue")], "What colour is the shape?", model="tiny-qwen2-vl").result()


def test_the_cli_prints_boxes_and_draws_them(families_server, tmp_path, capsys):
    _, image, truth = next((s, i, b) for s, i, b in placed(16) if s.shape == "circle")
    picture, drawn = tmp_path / "in.png", tmp_path / "out.png"
    image.save(picture)
    argv = ["detect", str(picture), "circle", "--model", "tiny-qwen2-vl", "--server", families_server.target]
    assert client_cli.main([*argv, "--draw", str(drawn)], environ={}) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("box x_min=") and "pixels=(" in printed[0], printed
    left, top, right, bottom = Box(*truth).pixels(*image.size)
    with Image.open(drawn) as out:
        rgb = out.convert("RGB")
    magenta = [(x, y) for x in range(rgb.width) for y in range(rgb.height) if rgb.getpixel((x, y)) == (255, 0, 255)]
    margin = max(image.size) // 4
    assert magenta and rgb.size == image.size
    assert all(left - margin <= x <= right + margin and top - margin <= y <= bottom + margin for x, y in magenta)
