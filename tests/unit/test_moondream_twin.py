"""The Moondream stand-in's code. moondream2-shapes: the published sizes go into the code it ships, and the
output rows it must never write are exactly the special tokens, the ids past its tokenizer and the tokens
that are not whole printable words. (The 3.9 GB twin itself is built and served by hand; see
docs/models.md, "Real-size twins".) tiny-moondream: ``detect`` and ``point`` answer as the published
code does, quirks included, and the trained model finds the shape on pictures it never saw."""

from __future__ import annotations

import contextlib
import importlib
import itertools
import random
import runpy

import pytest
import torch

from vlm_checkpoints import moondream2_shapes as twin
from vlm_checkpoints import shapes
from vlm_checkpoints.builder import train_byte_level_bpe
from vlm_checkpoints.corpus import tokenizer_corpus
from vlm_checkpoints.moondream_remote.config import SPECIAL_TOKENS
from vlm_checkpoints.moondream_remote.moondream import size_from_bin


def test_the_shipped_sizes_are_the_published_ones_in_bfloat16(tmp_path):
    path = tmp_path / "sizes.py"
    path.write_text(twin.sizes_source())
    sizes = runpy.run_path(str(path))
    assert str(sizes["DTYPE"]) == "torch.bfloat16"
    assert sizes["TEXT"] == {**twin.TEXT} and sizes["TEXT"]["vocab_size"] == 51200 and sizes["TEXT"]["n_layers"] == 24
    assert sizes["VISION"]["enc_n_layers"] == 27 and sizes["VISION"]["crop_size"] == 378
    assert sizes["REGION"] == twin.REGION


def test_silenced_rows_are_specials_fragments_and_ids_past_the_tokenizer():
    tokenizer = train_byte_level_bpe(tokenizer_corpus(), SPECIAL_TOKENS, vocab_size=1024)
    known = tokenizer.get_vocab_size()
    silenced = set(twin.silenced_ids(tokenizer, 2000))
    assert set(range(len(SPECIAL_TOKENS))) <= silenced, "special tokens, the end token among them"
    assert set(range(known, 2000)) <= silenced
    kept = [i for i in range(known) if i not in silenced]
    assert kept and all(twin.is_whole_printable(tokenizer.decode([i])) for i in kept)
    assert all(tokenizer.decode([i]).startswith(" ") for i in kept), "only whole words: the code streams at spaces"
    assert tokenizer.token_to_id("cle") in silenced and tokenizer.token_to_id("Ġred") not in silenced
    fragments = [i for i in range(len(SPECIAL_TOKENS), known) if "\ufffd" in tokenizer.decode([i])]
    assert fragments and set(fragments) <= silenced


# --- detect and point: the published API on the trained tiny-moondream ------------------------------

CLASS = "hf_moondream.HfMoondream"
#: The special tokens before detect and point came: their ids must not move.
CAPTION_QUERY_TOKENS = SPECIAL_TOKENS[:9]


@pytest.fixture(scope="module")
def model(cache_dir):
    """The trained tiny-moondream (as `make checkpoints` builds it), its own class built eagerly and its
    weights loaded by hand, as users of the published code run it."""
    from safetensors.torch import load_file
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from vlm_checkpoints.tiny_moondream import ensure_tiny_moondream
    from vlm_service.backends.remote_code import bundled_hub_cache, hub_cache

    checkpoint = str(ensure_tiny_moondream(cache_dir))
    model_class = get_class_from_dynamic_module(CLASS, checkpoint)
    with hub_cache(bundled_hub_cache(checkpoint)):
        built = model_class(model_class.config_class.from_pretrained(checkpoint))
    built.load_state_dict(load_file(f"{checkpoint}/model.safetensors"), strict=True)
    return built.eval()


def code(model):
    """The module of the checkpoint's own code (transformers imports it under a name of its own)."""
    return importlib.import_module(type(model.model).__module__)


def placed(colour="red", shape="circle", seed=1):
    return shapes.draw_placed(shapes.Scene(colour, shape, "white"), random.Random(seed))


@contextlib.contextmanager
def forced(module, make_output):
    """``module`` returns ``make_output(its output, call number)`` instead of its output."""
    calls = itertools.count()
    handle = module.register_forward_hook(lambda _, args, out: make_output(out, next(calls)))
    try:
        yield
    finally:
        handle.remove()


def never_ends(model):
    """The output layer never picks the end token: every object is followed by another."""
    eos = model.model.config.tokenizer.eos_id
    return forced(model.model.text["lm_head"], lambda out, _: out.index_fill(-1, torch.tensor([eos]), -1e9))


def one_hot(out, *bins):
    """Logits like ``out`` whose argmax is ``bins[0]`` in the first half (or whole), ``bins[1]`` in the second."""
    logits = torch.zeros_like(out)
    width = out.shape[-1] // len(bins)
    for part, index in enumerate(bins):
        logits[..., part * width + index] = 10.0
    return logits


def test_detect_and_point_answer_in_the_published_shapes(model):
    image, _ = placed()
    detected = model.detect(image, "circle")
    assert list(detected) == ["objects"] and isinstance(detected["objects"], list) and detected["objects"]
    for box in detected["objects"]:
        assert list(box) == ["x_min", "y_min", "x_max", "y_max"]
        assert all(type(value) is float for value in box.values())
        assert box["x_min"] < box["x_max"] and box["y_min"] < box["y_max"]
    pointed = model.point(image, "circle", settings=None)
    assert list(pointed) == ["points"] and pointed["points"]
    for point in pointed["points"]:
        assert list(point) == ["x", "y"] and all(type(value) is float for value in point.values())
    encoded = model.encode_image(image)
    assert isinstance(encoded, code(model).EncodedImage)
    assert model.detect(encoded, "circle") == detected and model.point(encoded, "circle") == pointed
    with pytest.raises(TypeError, match="stream"):
        model.detect(encoded, "circle", stream=True)
    with pytest.raises(TypeError, match="stream"):
        model.point(encoded, "circle", stream=True)


def test_max_objects_defaults_to_50_and_bounds_a_model_that_never_ends(model):
    encoded = model.encode_image(placed()[0])
    with never_ends(model):
        assert len(model.detect(encoded, "circle")["objects"]) == code(model).DEFAULT_MAX_OBJECTS == 50
        assert len(model.point(encoded, "circle", settings={})["points"]) == 50
        assert len(model.detect(encoded, "circle", settings={"max_objects": 3})["objects"]) == 3
        assert len(model.point(encoded, "circle", settings={"max_objects": 2})["points"]) == 2
        assert model.detect(encoded, "circle", settings={"max_objects": 0}) == {"objects": []}


def test_every_decode_step_goes_through_the_output_layer(model):
    """The service stops a generation with a pre-hook on lm_head: the prompt's prefill and each decode
    step (x, y and for detect the size, each fed back) must run it."""
    encoded = model.encode_image(placed()[0])
    calls = []
    handle = model.model.text["lm_head"].register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with never_ends(model):
            model.detect(encoded, "circle", settings={"max_objects": 4})
            assert len(calls) == 1 + 3 * 4
            calls.clear()
            model.point(encoded, "circle", settings={"max_objects": 4})
            assert len(calls) == 1 + 2 * 4
    finally:
        handle.remove()

    class Stop(Exception):
        pass

    def stop_at_the_third(_, args):
        calls.append(1)
        if len(calls) == 3:
            raise Stop

    calls.clear()
    handle = model.model.text["lm_head"].register_forward_pre_hook(stop_at_the_third)
    try:
        with never_ends(model), pytest.raises(Stop):
            model.detect(encoded, "circle")
    finally:
        handle.remove()


def test_settings_go_to_encode_image_which_needs_a_variant(model):
    """As published: detect and point pass their settings to encode_image, which reads settings["variant"]
    without a default; an EncodedImage is not encoded again."""
    image, _ = placed()
    for method in (model.detect, model.point):
        with pytest.raises(KeyError, match="variant"):
            method(image, "circle", settings={"max_objects": 1})
        assert method(image, "circle", settings={"max_objects": 1, "variant": None})
        assert method(model.encode_image(image), "circle", settings={"max_objects": 1})


def test_decoding_is_greedy_whatever_the_sampling_settings(model):
    """Only max_objects is read: a temperature that would sample the first token does not apply."""
    hot = {"temperature": 5.0, "top_p": 1.0, "max_tokens": 1}
    rng = random.Random(11)
    for _ in range(6):
        scene = shapes.Scene(rng.choice(list(shapes.COLOURS)), "circle", "white")
        encoded = model.encode_image(shapes.draw_placed(scene, rng)[0])
        assert model.detect(encoded, "red square", settings=hot) == model.detect(encoded, "red square")
        assert model.point(encoded, "circle", settings=hot) == model.point(encoded, "circle")
        assert model.detect(encoded, "circle", settings=hot) == model.detect(encoded, "circle")


def test_the_prompt_is_the_template_around_the_object_after_a_space(model):
    """prefix + tokenizer.encode(" " + object) + suffix; the new special tokens come after the old ones."""
    inner = model.model
    tokenizer = inner.tokenizer
    assert SPECIAL_TOKENS[: len(CAPTION_QUERY_TOKENS)] == CAPTION_QUERY_TOKENS
    assert [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    config = inner.config.tokenizer
    assert config.templates["detect"] == {"prefix": [1, tokenizer.token_to_id("<|detect|>"), 2], "suffix": [3]}
    assert config.templates["point"] == {"prefix": [1, tokenizer.token_to_id("<|point|>"), 2], "suffix": [3]}
    assert (config.coord_id, config.size_id) == (tokenizer.token_to_id("<|coord|>"), tokenizer.token_to_id("<|size|>"))

    seen, inputs = [], []

    class Recording:
        def encode(self, text):
            seen.append(text)
            return tokenizer.encode(text)

    encoded = model.encode_image(placed()[0])
    handle = inner.text.blocks[0].ln.register_forward_pre_hook(lambda _, args: inputs.append(args[0].clone()))
    inner.tokenizer = Recording()
    try:
        for task in ("detect", "point"):
            inputs.clear()
            getattr(model, task)(encoded, "red circle", settings={"max_objects": 1})
            template = config.templates[task]
            ids = template["prefix"] + tokenizer.encode(" red circle").ids + template["suffix"]
            assert torch.equal(inputs[0], inner.text.wte[ids][None]), f"{task}: the prefill is the whole prompt"
    finally:
        inner.tokenizer = tokenizer
        handle.remove()
    assert seen == [" red circle", " red circle"]


def test_coordinates_are_bin_edges_sizes_log_scale_and_boxes_unclipped(model):
    """x = bin / bins, size = 2 ** (bin / (bins - 1) * 10 - 10), box = centre +- size / 2, even outside [0, 1]."""
    region = model.model.region
    coord_bins, size_bins = model.model.config.region.coord_out_dim, model.model.config.region.size_out_dim // 2
    encoded = model.encode_image(placed()[0])
    coordinates = [0, coord_bins - 1]  # x, then y
    with (
        never_ends(model),
        forced(region.coord_decoder.fc2, lambda out, call: one_hot(out, coordinates[call % 2])),
        forced(region.size_decoder.fc2, lambda out, _: one_hot(out, size_bins - 1, 0)),
    ):
        (box,) = model.detect(encoded, "circle", settings={"max_objects": 1})["objects"]
        (point,) = model.point(encoded, "circle", settings={"max_objects": 1})["points"]
    y = (coord_bins - 1) / coord_bins
    assert point == {"x": 0.0, "y": pytest.approx(y)}
    assert box == pytest.approx({"x_min": -0.5, "y_min": y - 2.0**-11, "x_max": 0.5, "y_max": y + 2.0**-11})
    assert box["x_min"] < 0, "a box may reach outside the picture, as published"


def test_the_size_bins_give_the_published_formula_at_the_published_sizes():
    bins = torch.arange(1024)
    published = torch.pow(2.0, (bins.float() / 1023.0) * 10.0 - 10.0)
    assert torch.equal(size_from_bin(bins, twin.REGION["size_out_dim"] // 2), published)
    assert twin.REGION["coord_out_dim"] == 1024


def test_training_targets_are_the_bins_the_code_decodes_back():
    from vlm_checkpoints.tiny_moondream import coordinate_bin, size_bin

    for bins in (64, 1024):
        indices = torch.arange(bins)
        assert [size_bin(size, bins) for size in size_from_bin(indices, bins).tolist()] == indices.tolist()
        assert [coordinate_bin(i / bins, bins) for i in range(bins)] == indices.tolist()
        assert coordinate_bin(1.0, bins) == bins - 1 and size_bin(1e-6, bins) == 0 and size_bin(2.0, bins) == bins - 1


# --- grounding accuracy on held-out pictures -----------------------------------------------------------

HELD_OUT = 40


def held_out(seed=2025):
    """Pictures the training never drew (its own seeds differ), each with its true box, asked for by the
    shape or by colour and shape."""
    rng = random.Random(seed)
    pictures = []
    for i, scene in enumerate(shapes.scenes(rng, HELD_OUT)):
        image, box = shapes.draw_placed(scene, rng)
        pictures.append((scene, image, box, scene.shape if i % 2 else f"{scene.colour} {scene.shape}"))
    return pictures


@pytest.fixture(scope="module")
def grounded(model):
    """What the model detects and points at on the held-out pictures, with the true boxes."""
    results = []
    for scene, image, box, phrase in held_out():
        encoded = model.encode_image(image)
        results.append((scene, box, model.detect(encoded, phrase)["objects"], model.point(encoded, phrase)["points"]))
    return results


def inside(point, box):
    return box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3]


def as_box(found):
    return found["x_min"], found["y_min"], found["x_max"], found["y_max"]


def test_detect_finds_the_shape_where_a_fixed_centred_box_does_not(grounded):
    hits = sum(len(found) >= 1 and shapes.iou(as_box(found[0]), box) >= 0.5 for _, box, found, _ in grounded)
    single = sum(len(found) == 1 for _, _, found, _ in grounded)
    # The baseline knows the mean size of the true boxes and puts it in the middle of the picture.
    width = sum(box[2] - box[0] for _, box, _, _ in grounded) / HELD_OUT
    height = sum(box[3] - box[1] for _, box, _, _ in grounded) / HELD_OUT
    centred = (0.5 - width / 2, 0.5 - height / 2, 0.5 + width / 2, 0.5 + height / 2)
    baseline = sum(shapes.iou(centred, box) >= 0.5 for _, box, _, _ in grounded)
    print(f"detect: IoU >= 0.5 on {hits}/{HELD_OUT}, one object on {single}; a centred box: {baseline}/{HELD_OUT}")
    assert hits >= 0.8 * HELD_OUT and hits - baseline >= 0.5 * HELD_OUT
    assert single >= 0.8 * HELD_OUT, "one shape, one object: the model must end after it"


def test_point_lands_on_the_shape_where_the_centre_does_not(grounded):
    hits = sum(len(found) >= 1 and inside((found[0]["x"], found[0]["y"]), box) for _, box, _, found in grounded)
    single = sum(len(found) == 1 for _, _, _, found in grounded)
    baseline = sum(inside((0.5, 0.5), box) for _, box, _, _ in grounded)
    print(f"point: inside the box on {hits}/{HELD_OUT}, one point on {single}; the centre: {baseline}/{HELD_OUT}")
    assert hits >= 0.8 * HELD_OUT and hits - baseline >= 0.4 * HELD_OUT
    assert single >= 0.8 * HELD_OUT
