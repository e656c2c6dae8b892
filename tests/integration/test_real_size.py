"""Real size: the ``smolvlm-256m-shapes`` twin (SmolVLM-256M-Instruct's shapes, random weights)
streamed through a real server on 127.0.0.1:0, one 512-px tile, a few tokens.

`make test` builds the twin first (`make checkpoints`, about half a minute)."""

from __future__ import annotations

import json

import pytest
from transformers import AutoProcessor

from tests.helpers import ServerThread, caption_request, drain, query_request, shape_image
from vlm.v1 import vlm_service_pb2 as pb
from vlm_checkpoints.smolvlm_256m_shapes import ensure_smolvlm_256m_shapes
from vlm_checkpoints.twins import is_whole_printable
from vlm_service.backends.smolvlm import CAPTION_PROMPTS
from vlm_service.config import Settings
from vlm_service.types import CaptionLength


@pytest.fixture(scope="module")
def twin_dir(cache_dir):
    return ensure_smolvlm_256m_shapes(cache_dir)


@pytest.fixture(scope="module")
def one_tile_dir(twin_dir, tmp_path_factory):
    """The twin with its processor's single-view path (one 512-px view, no 4x4 split): the same
    weights (linked), ``do_image_splitting`` off, as a user would serve it for low latency."""
    view = tmp_path_factory.mktemp("smolvlm-256m-one-tile")
    for path in twin_dir.iterdir():
        if path.name != "processor_config.json":
            (view / path.name).symlink_to(path)
    processor_config = json.loads((twin_dir / "processor_config.json").read_text())
    processor_config["image_processor"]["do_image_splitting"] = False
    (view / "processor_config.json").write_text(json.dumps(processor_config))
    return view


@pytest.fixture(scope="module")
def twin_server(one_tile_dir, cache_dir):
    server = ServerThread(Settings(models=[f"twin={one_tile_dir}"], cache_dir=cache_dir, grace_period=0.0))
    server.wait_ready(timeout=600)
    yield server
    server.stop()


def test_the_published_processor_makes_sixteen_tiles_and_a_global_view(twin_dir):
    processor = AutoProcessor.from_pretrained(twin_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[[shape_image(size=(512, 512))]], return_tensors="pt")
    assert tuple(inputs["pixel_values"].shape[1:]) == (17, 3, 512, 512)
    image_tokens = int((inputs["input_ids"] == processor.image_token_id).sum())
    assert image_tokens == 17 * 64
    assert 1_100 <= inputs["input_ids"].shape[1] <= 1_250


@pytest.mark.parametrize("kind", ["caption", "query"])
def test_a_real_size_twin_streams_whole_text_to_the_asked_length(twin_server, kind):
    image = shape_image("blue", size=(300, 200))
    with twin_server.channel() as channel:
        stub = twin_server.stub(channel)
        if kind == "caption":
            call = stub.Caption(caption_request(image, model="twin", length=pb.CAPTION_LENGTH_SHORT, max_new_tokens=8))
        else:
            call = stub.Query(query_request("What is in the picture?", image, model="twin", max_new_tokens=8))
        messages = list(call)
    texts = [m.text for m in messages if m.text]
    final = messages[-1]
    assert len(texts) >= 3, texts  # streamed: several messages, not one at the end
    assert final.finish_reason == pb.FINISH_REASON_LENGTH
    assert final.usage.completion_tokens == 8
    # One 512-px view: 64 image tokens, its markers and the prompt's text.
    prompt_words = len(CAPTION_PROMPTS[CaptionLength.SHORT].split())
    assert 64 + prompt_words < final.usage.prompt_tokens < 200
    assert is_whole_printable("".join(texts))


def test_at_real_size_the_chunked_encoder_gives_the_models_own_features(twin_server):
    """At its defaults on a CPU, a model this size runs its encoder's layers with OpenVINO, three of
    SigLIP's 12 layers per chunk over one view, in the dtype the service chose (bfloat16 on a CPU with
    bfloat16 instructions, float32 otherwise): within that dtype's rounding of the model's own
    ``get_image_features``. With PyTorch's layers (``--openvino off``) the same chunks give its
    features bit for bit."""
    import torch

    from vlm_service.types import GenerationRequest, SamplingParams, Task

    backend = twin_server.engine.models["twin"].backend
    assert backend.prefill.chunked, "a model of this size prefills in chunks by default"
    assert backend.encodes_views, "a model of this size on a CPU runs its encoder with OpenVINO by default"
    request = GenerationRequest("r", "twin", Task.CAPTION, shape_image(size=(512, 512)), SamplingParams(4))
    inputs = backend.encode([backend.prompt(request)], [request.image])
    vision = {key: inputs[key] for key in ("pixel_values", "pixel_attention_mask")}
    with torch.inference_mode():
        expected = torch.cat(list(backend.model.get_image_features(**vision, return_dict=True).pooler_output))
        chunks, output = drain(backend.encode_views(vision))
        openvino, backend._openvino = backend._openvino, None
        try:
            _, own = drain(backend.encode_views(vision))
        finally:
            backend._openvino = openvino
    features = torch.cat(list(output.pooler_output))
    assert chunks == 12 // backend.prefill.vision_chunk_layers
    assert features.dtype == backend.model.dtype
    difference, scale = (features.float() - expected.float()).abs().max(), expected.float().abs().max()
    assert difference <= 0.05 * scale, (difference, scale)
    cosine = torch.nn.functional.cosine_similarity(features.float(), expected.float(), dim=-1)
    assert cosine.min() > 0.99, cosine.min()
    assert torch.equal(torch.cat(list(own.pooler_output)), expected)
