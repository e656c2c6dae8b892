"""ImageDetail: a caller trades detail for latency per request (LOW: one view; HIGH: the model's full
tiling), ListModels says what each level does on each model, and a level a model does not offer is
INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import grpc
import pytest
from PIL import Image

from tests.helpers import caption_request, query_request, run_rpc, shape_image
from vlm.v1 import vlm_service_pb2 as pb
from vlm_service.backends.qwen2_vl import LOW_DETAIL_PIXELS, Qwen2VLBackend
from vlm_service.backends.runtime import ModelSpec, Runtime
from vlm_service.types import GenerationRequest, ImageDetail, SamplingParams, Task

WIDE = shape_image("blue", size=(200, 90))  # tiny-smolvlm cuts it into 2 tiles and a global view


@pytest.fixture
def stub(families_server):
    with families_server.channel() as channel:
        yield families_server.stub(channel)


def _infos(stub) -> dict[str, pb.ModelInfo]:
    return {info.name: info for info in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}


def test_list_models_says_what_each_detail_level_does_on_each_model(stub, families_server):
    infos = _infos(stub)
    smolvlm = infos["tiny-smolvlm"]
    assert [t.detail for t in smolvlm.image_details] == [
        pb.IMAGE_DETAIL_AUTO,
        pb.IMAGE_DETAIL_LOW,
        pb.IMAGE_DETAIL_HIGH,
    ]
    processor = families_server.engine.models["tiny-smolvlm"].backend.processor
    images = processor.image_processor
    tile, longest, per_view = (
        images.max_image_size["longest_edge"],
        images.size["longest_edge"],
        processor.image_seq_len,
    )
    grid = -(-longest // tile)
    auto, low, high = smolvlm.image_details
    assert (low.max_views, low.max_image_tokens) == (1, per_view) and f"one {tile}-px view" == low.description
    assert (high.max_views, high.max_image_tokens) == (grid * grid + 1, (grid * grid + 1) * per_view)
    assert (
        grid > 1
        and images.do_image_splitting
        and (auto.max_views, auto.description) == (high.max_views, high.description)
    )
    qwen = infos["tiny-qwen2-vl"]
    assert [t.detail for t in qwen.image_details] == [pb.IMAGE_DETAIL_AUTO, pb.IMAGE_DETAIL_LOW, pb.IMAGE_DETAIL_HIGH]
    assert all(t.max_views == 1 and t.max_image_tokens > 0 for t in qwen.image_details)
    moondream = infos["tiny-moondream"]
    assert [t.detail for t in moondream.image_details] == [pb.IMAGE_DETAIL_AUTO]


def test_low_detail_is_one_view_and_fewer_prompt_tokens_and_auto_is_the_processors_default(stub, families_server):
    usage = {}
    for detail in (pb.IMAGE_DETAIL_UNSPECIFIED, pb.IMAGE_DETAIL_AUTO, pb.IMAGE_DETAIL_LOW, pb.IMAGE_DETAIL_HIGH):
        request = caption_request(WIDE, model="tiny-smolvlm", detail=detail, max_new_tokens=12)
        text, last = run_rpc(families_server, request)
        assert text.strip() and last.finish_reason != pb.FINISH_REASON_UNSPECIFIED
        usage[detail] = last.usage.prompt_tokens
    per_view = families_server.engine.models["tiny-smolvlm"].backend.processor.image_seq_len
    # tiny-smolvlm splits by default: AUTO is HIGH; the wide picture is 2 tiles and a global view.
    assert usage[pb.IMAGE_DETAIL_UNSPECIFIED] == usage[pb.IMAGE_DETAIL_AUTO] == usage[pb.IMAGE_DETAIL_HIGH]
    assert usage[pb.IMAGE_DETAIL_HIGH] - usage[pb.IMAGE_DETAIL_LOW] >= 2 * per_view, usage


def test_the_image_cache_keeps_each_detail_of_one_picture_apart(stub, families_server):
    """The same bytes at LOW, HIGH, then LOW again: each answer is its own level's (the cache holds the
    picture's preprocessing and features per level, never one level's for another)."""
    image = shape_image("green", size=(90, 200))
    low = run_rpc(
        families_server,
        query_request("What colour is the shape?", image, model="tiny-smolvlm", detail=pb.IMAGE_DETAIL_LOW),
    )
    high = run_rpc(
        families_server,
        query_request("What colour is the shape?", image, model="tiny-smolvlm", detail=pb.IMAGE_DETAIL_HIGH),
    )
    again = run_rpc(
        families_server,
        query_request("What colour is the shape?", image, model="tiny-smolvlm", detail=pb.IMAGE_DETAIL_LOW),
    )
    assert high[1].usage.prompt_tokens > low[1].usage.prompt_tokens
    assert again[0] == low[0] and again[1].usage.prompt_tokens == low[1].usage.prompt_tokens
    cache = families_server.engine.models["tiny-smolvlm"].backend.images
    assert cache.get(f"{_digest(image)}/low", "features") is not None
    assert cache.get(f"{_digest(image)}/high", "features") is not None


def _digest(image: Image.Image) -> str:
    from tests.helpers import png_bytes
    from vlm_service.images.decode import image_digest

    return image_digest(png_bytes(image))


@pytest.mark.parametrize("detail", [pb.IMAGE_DETAIL_LOW, pb.IMAGE_DETAIL_HIGH])
def test_a_level_the_model_does_not_offer_is_invalid_argument_naming_the_field(stub, detail):
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Caption(caption_request(model="tiny-moondream", detail=detail), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "detail" in info.value.details() and "it offers: auto" in info.value.details()


def test_an_unknown_detail_value_is_invalid_argument(stub):
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Query(query_request("What colour?", model="tiny-smolvlm", detail=9), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown image detail 9" in info.value.details()


def test_qwen2_vl_low_detail_caps_the_pixels_and_so_the_image_tokens(cache_dir):
    """Qwen2-VL sees one view at any resolution: LOW keeps at most 512x512 pixels' worth. The tiny
    model's processor keeps few pixels, so the published one's limit is set on it here."""
    from vlm_checkpoints.tiny_qwen2_vl import ensure_tiny_qwen2_vl

    backend = Qwen2VLBackend(ModelSpec("q", str(ensure_tiny_qwen2_vl(cache_dir))), Runtime(device="cpu"))
    backend.load()
    images = backend.processor.image_processor
    images.size = {"shortest_edge": images.size["shortest_edge"], "longest_edge": 12_845_056}
    image_token = backend.processor.tokenizer.convert_tokens_to_ids(backend.processor.image_token)
    picture = Image.new("RGB", (1120, 840), "white")  # multiples of 28: no rounding
    tokens = {}
    for detail in ImageDetail:
        request = GenerationRequest("r", "q", Task.CAPTION, picture, SamplingParams(4), detail=detail)
        tokens[detail] = int((backend.prepare(request)["input_ids"] == image_token).sum())
    per_token = (images.patch_size * images.merge_size) ** 2
    assert tokens[ImageDetail.AUTO] == tokens[ImageDetail.HIGH] == 1120 * 840 // per_token
    assert 0 < tokens[ImageDetail.LOW] <= LOW_DETAIL_PIXELS // per_token < tokens[ImageDetail.HIGH]
    tilings = backend.image_tilings()
    assert tilings[ImageDetail.LOW].max_image_tokens == LOW_DETAIL_PIXELS // per_token
    assert tilings[ImageDetail.HIGH].max_image_tokens == 12_845_056 // per_token
