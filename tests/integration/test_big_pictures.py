"""Big pictures with real models: each is reduced to the largest picture its model uses as it is
decoded, so the processor on the model's thread never touches more. How long health and a running
stream wait under a flood is measured by ``make bench-flood``."""

from __future__ import annotations

import torch

from tests.helpers import ServerThread, caption_request, shape_image
from tests.integration.test_lifecycle import big_picture
from vlm.v1 import vlm_service_pb2 as pb
from vlm_service.config import Settings
from vlm_service.images.decode import image_digest


def test_a_big_picture_reaches_the_processor_reduced_to_the_models_longest_edge(smolvlm_server, monkeypatch):
    """A 36-megapixel picture is reduced as it is decoded: the processor (on the model's thread) gets it
    at the longest edge it uses, so a big newcomer costs the running streams a small picture's work."""
    backend = smolvlm_server.engine.models["noise"].backend
    picture = big_picture()
    digest = image_digest(picture)
    real_prepare = backend.prepare
    seen = []

    def prepare(request):
        if request.image_digest == digest:
            seen.append(request.image.size)
        return real_prepare(request)

    monkeypatch.setattr(backend, "prepare", prepare)
    with smolvlm_server.channel() as channel:
        big = list(smolvlm_server.stub(channel).Caption(caption_request(picture, model="noise", max_new_tokens=2)))
    assert big[-1].finish_reason == pb.FINISH_REASON_LENGTH
    longest = min(backend.processor.image_processor.size["longest_edge"], 4096)
    assert seen == [(longest, longest)] and longest < 6000, f"the processor got {seen}"


def test_preparing_a_request_leaves_the_models_torch_thread_count_alone(cache_dir, noise_dir):
    """The model's thread runs with the count it was given (``--torch-threads 2``) whatever its requests
    went through: torch.set_num_threads in one thread reaches the others, so nothing but the loader and
    the schedulers may call it (a preparation pool that set one thread for itself left a real-size model
    decoding on one core, 1.9x slower)."""
    server = ServerThread(Settings(models=[f"noise={noise_dir}"], cache_dir=cache_dir, torch_threads=2, grace_period=0))
    try:
        server.wait_ready()
        scheduler = server.engine.models["noise"].scheduler
        counts: list[int] = []
        scheduler.step_gate = lambda job: counts.append(torch.get_num_threads())  # in the model's thread
        with server.channel() as channel:
            stub = server.stub(channel)
            for colour in ("red", "green", "blue"):
                list(stub.Caption(caption_request(shape_image(colour), max_new_tokens=4), timeout=60))
        assert counts and set(counts) == {2}, counts
    finally:
        server.stop()


def test_what_a_ready_model_loaded_is_frozen_out_of_the_garbage_collectors_sight(smolvlm_server):
    """A full collection over everything torch, transformers and the model made stopped the whole server
    for 230 ms under a flood (make bench-flood); once a model is ready, what is loaded is frozen, so a
    collection walks only what requests make."""
    import gc

    assert smolvlm_server.engine.models["noise"].backend is not None
    frozen = gc.get_freeze_count()
    assert frozen > 100_000, f"only {frozen} objects are frozen"


def test_pictures_over_the_byte_or_pixel_cap_are_refused_over_the_wire_before_any_decode_or_processor(
    noise_server, monkeypatch
):
    """Through a real server and model: a picture over --max-image-bytes, and one whose header alone
    says it is over --max-image-pixels (a PNG of 20,000 x 10,000 that is only its header, 57 bytes: a
    full decode would fail as truncated, not name the pixel cap), get INVALID_ARGUMENT naming their cap,
    and the model's processor never runs for either."""
    import grpc

    from tests.unit.test_images import png_header

    server = noise_server(max_image_bytes=200_000, max_image_pixels=50_000_000)
    backend = server.engine.models["noise"].backend
    processed = []
    real_prepare = backend.prepare
    monkeypatch.setattr(backend, "prepare", lambda request: processed.append(request) or real_prepare(request))
    heavy = big_picture()  # 36 MP, 688 KB: over the byte cap
    assert len(heavy) > 200_000
    with server.channel() as channel:
        stub = server.stub(channel)
        refusals = []
        for data in (heavy, png_header(20_000, 10_000)):
            try:
                list(stub.Caption(caption_request(data, model="noise", max_new_tokens=2), timeout=60))
            except grpc.RpcError as error:
                refusals.append((error.code(), error.details()))
        assert [code for code, _ in refusals] == [grpc.StatusCode.INVALID_ARGUMENT] * 2, refusals
        assert f"the image is {len(heavy)} bytes; the limit is 200000" in refusals[0][1]
        assert "20000x10000 = 200000000 pixels; the limit is 50000000" in refusals[1][1]
        assert processed == [], "the processor ran for a refused picture"
        # The same server still serves a good picture (and its processor runs for it).
        answer = list(stub.Caption(caption_request(shape_image("red"), model="noise", max_new_tokens=2)))
        assert answer[-1].usage.completion_tokens == 2 and len(processed) == 1
