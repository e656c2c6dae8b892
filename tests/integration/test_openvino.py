"""SmolVLM on OpenVINO (``--openvino on``; auto on a CPU for a model of 50M parameters or more): its
vision encoder layers give PyTorch's features within the dtype's rounding, its decode step PyTorch's
logits and cache, the trained tiny model still answers right, and a request's answer is the same alone
as in a batch.

The tiny checkpoints are under 50M parameters, so auto keeps PyTorch for them: these tests ask for
OpenVINO. test_real_size.py checks the default at real size."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import ServerThread, Sink, drain, query_request, run_as_one_batch, run_rpc, shape_image
from tests.integration.test_demo_model import held_out_accuracy
from vlm_service.backends.base import run_alone
from vlm_service.backends.hf import TransformersBackend
from vlm_service.backends.runtime import ModelSpec, Runtime
from vlm_service.backends.smolvlm import SmolVLMBackend
from vlm_service.config import Settings
from vlm_service.types import GenerationRequest, SamplingParams, Task

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SIZES = [(64, 64), (200, 90), (90, 200), (48, 150), (320, 240), (100, 100)]


def backend_of(directory, openvino: str, chunked: str = "on", dtype: str = "float32") -> SmolVLMBackend:
    backend = SmolVLMBackend(
        ModelSpec("tiny", str(directory)),
        Runtime(device="cpu", dtype=dtype, chunked_prefill=chunked, openvino=openvino),
    )
    backend.load()
    return backend


def features(backend: SmolVLMBackend, image) -> torch.Tensor:
    request = GenerationRequest("r", "tiny", Task.CAPTION, image, SamplingParams(4))
    inputs = backend.encode([backend.prompt(request)], [image])
    vision = {key: inputs[key] for key in backend.vision_inputs}
    with torch.inference_mode():
        _, output = drain(backend.encode_views(vision))
    return torch.cat(list(output.pooler_output)).float()


@pytest.mark.parametrize("chunked", ["on", "off"])
def test_the_openvino_layers_give_pytorchs_features_in_float32(tiny_smolvlm_dir, chunked):
    torch_backend = backend_of(tiny_smolvlm_dir, "off", chunked)
    openvino = backend_of(tiny_smolvlm_dir, "on", chunked)
    assert openvino.encodes_views and not torch_backend.encodes_views
    for size in [(96, 64), (320, 240), (48, 150)]:  # one view, several tiles, a padded view
        image = shape_image("blue", size=size)
        expected, got = features(torch_backend, image), features(openvino, image)
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()


def test_the_openvino_layers_run_in_the_models_dtype(tiny_smolvlm_dir):
    """bfloat16 model: OpenVINO computes in bfloat16 too (close to PyTorch's bfloat16, not equal)."""
    torch_backend = backend_of(tiny_smolvlm_dir, "off", dtype="bfloat16")
    openvino = backend_of(tiny_smolvlm_dir, "on", dtype="bfloat16")
    image = shape_image("green", size=(200, 90))
    expected, got = features(torch_backend, image), features(openvino, image)
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 0.05 * scale, ((got - expected).abs().max(), scale)
    cosine = torch.nn.functional.cosine_similarity(got, expected, dim=-1)
    assert cosine.min() > 0.99, cosine.min()


def test_the_openvino_decode_step_gives_pytorchs_logits_and_cache_in_float32(tiny_smolvlm_dir):
    """One decode step over two rows of different lengths (the shorter one left-padded), as the batch
    runs it: OpenVINO's logits and extended cache against the model's own forward pass."""
    backend = backend_of(tiny_smolvlm_dir, "on", chunked="off")
    assert backend._decoder is not None
    requests = [
        GenerationRequest("r", "tiny", Task.QUERY, shape_image("red", size=(96, 64)), SamplingParams(8), "Colour?"),
        GenerationRequest("r", "tiny", Task.CAPTION, shape_image("blue", size=(320, 240)), SamplingParams(8)),
    ]
    batch = backend.new_batch(4)
    for request in requests:
        batch.join(request, Sink())
    batch.prefill_step()
    assert len(batch) == 2 and batch._mask[:, 0].tolist().count(0) == 1, "one row should be left-padded"
    mask = torch.nn.functional.pad(batch._mask, (0, 1), value=1)
    ids = torch.tensor([[row.next_token] for row in batch.rows])
    positions = torch.tensor([[row.position] for row in batch.rows])

    def copy(cache):
        return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]

    before = copy(batch._cache)
    with torch.inference_mode():
        logits, cache = backend.decode(ids, mask, positions, batch._cache)
        assert [(k.shape, v.shape) for k, v in copy(batch._cache)] == [(k.shape, v.shape) for k, v in before]
        expected_logits, expected_cache = TransformersBackend.decode(backend, ids, mask, positions, batch._cache)
    assert torch.allclose(logits, expected_logits.float(), atol=1e-4), (logits - expected_logits).abs().max()
    for (k, v), (ek, ev) in zip(copy(cache), copy(expected_cache), strict=True):
        assert k.shape == ek.shape and torch.allclose(k, ek, atol=1e-4) and torch.allclose(v, ev, atol=1e-4)


def test_a_request_answers_the_same_alone_and_prefilled_with_others(tiny_smolvlm_dir):
    backend = backend_of(tiny_smolvlm_dir, "on", chunked="off")
    assert backend.prefills_together
    requests = [
        GenerationRequest(
            "r", "tiny", Task.QUERY, shape_image(c, size=s), SamplingParams(20), "What colour is the shape?"
        )
        for c, s in zip(COLOURS, SIZES, strict=True)
    ]

    def answers_alone(backend):
        out = []
        for request in requests:
            sink = Sink()
            run_alone(backend.new_batch(1), request, sink)
            out.append(sink.text)
        return out

    alone = answers_alone(backend)
    batch, sinks = backend.new_batch(8), [Sink() for _ in requests]
    for request, sink in zip(requests, sinks, strict=True):
        batch.join(request, sink)
    batch.prefill_step()
    while len(batch):
        batch.decode_step()
    assert [sink.text for sink in sinks] == alone
    assert alone == answers_alone(backend_of(tiny_smolvlm_dir, "off", chunked="off")), "float32: PyTorch's answers"


@pytest.fixture(scope="module")
def openvino_server(cache_dir, tiny_smolvlm_dir):
    settings = Settings(models=["tiny-smolvlm"], cache_dir=cache_dir, grace_period=0.0, openvino="on")
    server = ServerThread(settings)
    server.wait_ready(timeout=300)
    yield server
    server.stop()


def test_the_trained_tiny_smolvlm_answers_right_through_a_server_with_the_openvino_encoder(openvino_server):
    backend = openvino_server.engine.models["tiny-smolvlm"].backend
    assert backend.encodes_views, "the server did not run the encoder with OpenVINO"
    with openvino_server.channel() as channel:
        accuracy = held_out_accuracy(openvino_server.stub(channel), "tiny-smolvlm")
    print(f"tiny-smolvlm with the OpenVINO encoder: colour accuracy on 42 held-out pictures {accuracy:.0%}")
    assert accuracy == 1.0
    requests = [
        query_request("What colour is the shape?", shape_image(c, size=s), model="tiny-smolvlm", max_new_tokens=20)
        for c, s in zip(COLOURS, SIZES, strict=True)
    ]
    alone = [run_rpc(openvino_server, r)[0] for r in requests]
    together = [text for text, _ in run_as_one_batch(openvino_server, "tiny-smolvlm", requests)]
    assert together == alone
