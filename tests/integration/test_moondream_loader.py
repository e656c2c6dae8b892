"""Loading Moondream2-style remote code under transformers 5.

`tiny-moondream` behaves as Moondream2's published code (revision 2025-06-21) does: no `post_init`,
buffers made in `__init__` and never saved, sizes and dtype fixed by the code, the tokenizer read by
repo name from a Hugging Face cache, `settings["variant"]` without a default, streams of text pieces.
These tests show that the loader the service had before fails on it, and that the present one gives
the same model as building the class eagerly and loading its weights by hand."""

from __future__ import annotations

import logging
import random

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from tests.helpers import Sink
from vlm_checkpoints import shapes
from vlm_service.backends import runtime
from vlm_service.backends.moondream import MoondreamBackend
from vlm_service.backends.remote_code import bundled_hub_cache, hub_cache
from vlm_service.backends.runtime import ModelSpec, Runtime
from vlm_service.types import CaptionLength, GenerationRequest, SamplingParams, Task

CLASS = "hf_moondream.HfMoondream"


@pytest.fixture(scope="module")
def checkpoint(cache_dir):
    """tiny-moondream with random weights: loading is what is tested here, not what it answers."""
    from vlm_checkpoints.tiny_moondream import ensure_tiny_moondream

    return str(ensure_tiny_moondream(cache_dir, trained=False))


@pytest.fixture(scope="module")
def backend(checkpoint):
    backend = MoondreamBackend(ModelSpec("noise-moondream", checkpoint), Runtime(device="cpu"))
    backend.load()
    return backend


@pytest.fixture(scope="module")
def by_hand(checkpoint):
    """The checkpoint's own class built eagerly on the CPU, its weights loaded with load_state_dict."""
    model_class = get_class_from_dynamic_module(CLASS, checkpoint)
    with hub_cache(bundled_hub_cache(checkpoint)):
        model = model_class(model_class.config_class.from_pretrained(checkpoint))
    model.load_state_dict(load_file(f"{checkpoint}/model.safetensors"), strict=True)
    return model.eval()


def picture(colour="green", shape="triangle", seed=3):
    return shapes.draw(shapes.Scene(colour, shape, "white"), random.Random(seed))


def test_the_previous_loader_fails_on_the_stand_in(checkpoint):
    """What `MoondreamBackend.load` did before (transformers' from_pretrained), as the published code
    fails under transformers 5: the class never calls post_init."""
    with hub_cache(bundled_hub_cache(checkpoint)), pytest.raises(AttributeError, match="all_tied_weights_keys"):
        AutoModelForCausalLM.from_pretrained(
            checkpoint, trust_remote_code=True, dtype=torch.float32, device_map={"": "cpu"}
        )


def test_with_a_post_init_shim_the_unsaved_buffers_come_back_uninitialised(checkpoint, by_hand):
    """With post_init added, from_pretrained loads, but on the meta device: the buffers __init__ makes
    and never saves are not what __init__ makes (which is why such a model writes NaN)."""
    model_class = get_class_from_dynamic_module(CLASS, checkpoint)

    class WithPostInit(model_class):
        def __init__(self, config):
            super().__init__(config)
            self.post_init()

    with hub_cache(bundled_hub_cache(checkpoint)):
        shimmed = WithPostInit.from_pretrained(checkpoint, dtype=torch.float32, device_map={"": "cpu"})
    assert not torch.equal(shimmed.model.attn_mask, by_hand.model.attn_mask)
    assert not torch.equal(shimmed.model.text.freqs_cis, by_hand.model.text.freqs_cis)


def test_the_loader_gives_the_model_built_eagerly_and_loaded_by_hand(backend, by_hand):
    loaded, reference = backend.model.model, by_hand.model
    assert loaded.attn_mask.any() and torch.equal(loaded.attn_mask, reference.attn_mask)
    assert torch.equal(loaded.text.freqs_cis, reference.text.freqs_cis)
    mine, theirs = dict(backend.model.named_parameters()), dict(by_hand.named_parameters())
    assert mine.keys() == theirs.keys()
    for name, parameter in mine.items():
        assert torch.equal(parameter, theirs[name]), name
    image = picture()
    encoded, expected = backend.model.encode_image(image), by_hand.encode_image(image)
    for (k, v), (k_ref, v_ref) in zip(encoded.caches, expected.caches, strict=True):
        assert torch.isfinite(k).all() and torch.isfinite(v).all()
        assert torch.equal(k, k_ref) and torch.equal(v, v_ref)


@pytest.mark.parametrize("task", [Task.CAPTION, Task.QUERY])
def test_streamed_answers_equal_the_hand_loaded_models(backend, by_hand, task):
    image = picture("blue", "square", seed=7)
    question = shapes.COLOUR_QUESTION if task is Task.QUERY else ""
    request = GenerationRequest("t", "noise-moondream", task, image, SamplingParams(30), question, CaptionLength.SHORT)
    sink = Sink()
    backend.generate(request, sink)
    settings = {"temperature": 0, "max_tokens": 30}
    encoded = by_hand.encode_image(image)
    if task is Task.CAPTION:
        expected = by_hand.caption(encoded, length="short", settings=settings)["caption"]
    else:
        expected = by_hand.query(encoded, question, settings=settings)["answer"]
    assert expected and "".join(sink.pieces) == expected


def test_the_asked_dtype_applies_and_is_what_is_reported(backend, caplog):
    """The code makes float32 weights; --dtype bfloat16 casts them, and that is what is reported."""
    assert {p.dtype for p in backend.model.parameters()} == {torch.float32} and backend.dtype == "float32"
    again = MoondreamBackend(backend.spec, Runtime(device="cpu", dtype="bfloat16"))
    with caplog.at_level("INFO", logger="vlm_service.backends.moondream"):
        again.load()
    assert {p.dtype for p in again.model.parameters()} == {torch.bfloat16} and again.dtype == "bfloat16"
    assert "makes float32 weights; cast to bfloat16" in caplog.text and "as bfloat16" in caplog.text
    assert again.model.model.text.freqs_cis.dtype == torch.float32, "the code's buffers keep their dtype"
    request = GenerationRequest("t", "m", Task.CAPTION, picture(), SamplingParams(12), length=CaptionLength.SHORT)
    sink = Sink()
    again.generate(request, sink)
    assert "".join(sink.pieces).strip()


@pytest.fixture(scope="module")
def bfloat16_checkpoint(checkpoint, tmp_path_factory):
    """The stand-in as Moondream2 ships: code that fixes bfloat16 weights (and makes its crops in it)."""
    import shutil

    directory = tmp_path_factory.mktemp("bf16") / "moondream-bf16"
    shutil.copytree(checkpoint, directory)
    sizes = directory / "sizes.py"
    sizes.write_text(sizes.read_text().replace("DTYPE = torch.float32", "DTYPE = torch.bfloat16"))
    assert "torch.bfloat16" in sizes.read_text()
    return str(directory)


def test_bfloat16_code_runs_in_float32_on_a_cpu_and_computes_what_its_own_dtype_does(bfloat16_checkpoint, monkeypatch):
    """--dtype auto on a CPU without bfloat16 instructions is float32 (bfloat16 matrices are ~30x
    slower there). The code still makes its image crops in bfloat16: the loader casts them at the layer
    that reads them, so the model computes what the code's own bfloat16 model does, up to bfloat16's
    rounding, and without that cast the code cannot run in float32 at all."""
    monkeypatch.setattr(runtime, "native_bfloat16", lambda: False)  # an AVX2 CPU, whatever this one has
    backend = MoondreamBackend(ModelSpec("md-bf16", bfloat16_checkpoint), Runtime(device="cpu"))
    backend.load()
    assert backend.dtype == "float32" and {p.dtype for p in backend.model.parameters()} == {torch.float32}
    model_class = get_class_from_dynamic_module(CLASS, bfloat16_checkpoint)
    with hub_cache(bundled_hub_cache(bfloat16_checkpoint)):
        own = model_class(model_class.config_class.from_pretrained(bfloat16_checkpoint))
    own.load_state_dict(load_file(f"{bfloat16_checkpoint}/model.safetensors"), strict=True)
    own.eval()
    assert own.model.text.wte.dtype == torch.bfloat16
    image = picture("red", "circle")
    cast, native = backend.model.encode_image(image), own.encode_image(image)
    for (k, v), (k_own, v_own) in zip(cast.caches, native.caches, strict=True):
        assert k.dtype == torch.float32 and torch.isfinite(k).all() and torch.isfinite(v).all()
        torch.testing.assert_close(k, k_own.float(), rtol=0.05, atol=0.05)
        torch.testing.assert_close(v, v_own.float(), rtol=0.05, atol=0.05)
    with pytest.raises(RuntimeError, match="dtype"):
        own.float().encode_image(image)  # a plain cast: the bfloat16 crops meet float32 weights


def test_bfloat16_code_keeps_bfloat16_on_a_cpu_with_bfloat16_instructions(bfloat16_checkpoint, monkeypatch, caplog):
    """--dtype auto on a CPU with AVX512-BF16 or AMX keeps the dtype the code fixes: nothing is cast,
    and the served answer is the code's own bfloat16 model's."""
    monkeypatch.setattr(runtime, "native_bfloat16", lambda: True)
    caplog.set_level(logging.INFO, logger="vlm_service")
    backend = MoondreamBackend(ModelSpec("md-bf16", bfloat16_checkpoint), Runtime(device="cpu"))
    backend.load()
    assert backend.dtype == "bfloat16" and {p.dtype for p in backend.model.parameters()} == {torch.bfloat16}
    assert "cast to" not in caplog.text and "as bfloat16" in caplog.text
    image, sink = picture("red", "circle"), Sink()
    request = GenerationRequest("t", "md-bf16", Task.CAPTION, image, SamplingParams(30), "", CaptionLength.SHORT)
    backend.generate(request, sink)
    model_class = get_class_from_dynamic_module(CLASS, bfloat16_checkpoint)
    with hub_cache(bundled_hub_cache(bfloat16_checkpoint)):
        own = model_class(model_class.config_class.from_pretrained(bfloat16_checkpoint))
    own.load_state_dict(load_file(f"{bfloat16_checkpoint}/model.safetensors"), strict=True)
    settings = {"temperature": 0, "max_tokens": 30}
    expected = own.eval().caption(own.encode_image(image), length="short", settings=settings)["caption"]
    assert expected and "".join(sink.pieces) == expected


# --- the stand-in has the published code's traits --------------------------------------------------


def test_the_stand_in_never_calls_post_init_and_ignores_config_sizes(checkpoint, by_hand):
    assert not hasattr(by_hand, "all_tied_weights_keys")
    model_class = get_class_from_dynamic_module(CLASS, checkpoint)
    config = model_class.config_class(config={"text": {"dim": 8}})
    assert config.config == {}, "sizes come from the code, never from config.json"
    assert by_hand.model.text.wte.dtype == torch.float32


def test_the_stand_in_reads_its_tokenizer_by_repo_name_from_a_hub_cache(checkpoint, tmp_path):
    """No tokenizer.json beside the weights: without a hub cache holding its repo, building fails."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    model_class = get_class_from_dynamic_module(CLASS, checkpoint)
    config = model_class.config_class.from_pretrained(checkpoint)
    with hub_cache(tmp_path), pytest.raises(LocalEntryNotFoundError):
        model_class(config)


def test_encode_image_settings_need_a_variant(by_hand):
    with pytest.raises(KeyError, match="variant"):
        by_hand.encode_image(picture(), settings={"max_tokens": 3})
    with pytest.raises(KeyError, match="variant"):
        by_hand.caption(picture(), settings={"max_tokens": 3})  # caption passes its settings on


def test_streams_are_text_pieces_ending_at_word_boundaries(by_hand):
    encoded = by_hand.encode_image(picture("red", "circle"))
    settings = {"temperature": 0, "max_tokens": 120}
    pieces = list(by_hand.caption(encoded, length="long", stream=True, settings=settings)["caption"])
    assert len(pieces) >= 2 and all(isinstance(piece, str) for piece in pieces)
    assert all(piece.endswith(" ") for piece in pieces[:-1])
    assert "".join(pieces) == by_hand.caption(encoded, length="long", settings=settings)["caption"]
