"""``tiny-moondream``: a tiny local *remote-code* checkpoint that behaves as Moondream2's published code.

The directory holds ``config.json`` (whose ``auto_map`` points at ``hf_moondream.py``), the remote code
(``moondream_remote/``: ``hf_moondream.py``, ``moondream.py``, ``config.py``, ``sizes.py``), the weights,
and ``hf-cache/``, a Hugging Face hub cache holding the tokenizer under the repo name the code loads it
by (``Tokenizer.from_pretrained``), as Moondream2's code loads ``moondream/starmie-v1``. The model is
trained on the synthetic shapes through the very prompt templates its ``caption``/``query`` use, and to
ground (``detect``/``point``) on pictures with the shape anywhere (``shapes.draw_placed``), teacher-forced
through the region head as the code's decode loop feeds it.
"""

from __future__ import annotations

import functools
import json
import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from .builder import TOKENIZER_SOURCES, TRAINING_SOURCES, BuildInputs, ensure_checkpoint, train_byte_level_bpe
from .corpus import tokenizer_corpus

REMOTE_DIR = Path(__file__).parent / "moondream_remote"
REMOTE_FILES = ("hf_moondream.py", "moondream.py", "config.py", "sizes.py")
AUTO_MAP = {"AutoConfig": "hf_moondream.HfConfig", "AutoModelForCausalLM": "hf_moondream.HfMoondream"}
#: Training on the synthetic shapes; empty means random weights.
TRAIN = {"steps": 2000, "distinct_batches": 300, "lr": 3e-3}
#: Then grounding: ``per_batch`` detect/point examples in each batch beside ``batch_size`` captions and
#: questions (what the first part taught, kept), ``negatives`` the share of them that ask for a shape
#: the picture does not hold (the answer: no object), ``sigma`` the width in bins of the coordinates' and
#: sizes' soft targets.
GROUNDING = {
    "train": {"steps": 3000, "batch_size": 4, "distinct_batches": 1000, "lr": 3e-3, "seed": 1},
    "per_batch": 16,
    "negatives": 0.4,
    "sigma": 1.0,
    "seed": 1,
}


def write_tokenizer_cache(directory: Path) -> None:
    """Train the tokenizer and put it in the checkpoint's own hub cache, under the code's repo name."""
    from vlm_service.backends.remote_code import BUNDLED_HUB_CACHE, write_hub_file

    from .moondream_remote.config import SPECIAL_TOKENS
    from .moondream_remote.moondream import TOKENIZER_REPO

    tokenizer = train_byte_level_bpe(tokenizer_corpus(), SPECIAL_TOKENS, vocab_size=1024)
    assert [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    write_hub_file(directory / BUNDLED_HUB_CACHE, TOKENIZER_REPO, "tokenizer.json", tokenizer.to_str().encode())


def initialise(model) -> None:
    """Small random weights (the code leaves ``wte`` and the region features uninitialised)."""
    import torch
    from torch import nn

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        inner = model.model
        nn.init.normal_(inner.text.wte, std=0.02)
        nn.init.normal_(inner.vision.pos_emb, std=math.sqrt(1 / inner.config.vision.enc_dim))
        nn.init.normal_(inner.region.coord_features, std=1.0)
        nn.init.normal_(inner.region.size_features, std=1.0)


def save(model, directory: Path, remote_files: dict[str, Path]) -> None:
    """Weights (safetensors), the remote code, and a ``config.json`` whose ``auto_map`` points at it."""
    from safetensors.torch import save_file

    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    for name, path in remote_files.items():
        shutil.copyfile(path, directory / name)
    config = model.config.to_dict()
    config.update(auto_map=AUTO_MAP, architectures=["HfMoondream"], model_type="moondream1")
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


@dataclass(frozen=True)
class Grounding:
    """One ``detect``/``point`` example: the prompt the code builds for it, and the object's box
    (normalized x_min, y_min, x_max, y_max), None when the picture does not hold it."""

    prompt: list[int]
    box: tuple[float, float, float, float] | None
    size: bool  # detect (x, y, then the size) rather than point (x, y)


def grounding_examples(inner, rng: random.Random, count: int, negatives: float) -> list:
    """(image pixels, Grounding) pairs on pictures with the shape anywhere: asked for by its shape
    ("circle") or colour and shape ("red circle"); with probability ``negatives`` for a shape that is
    not there."""
    from . import shapes

    templates = inner.config.tokenizer.templates
    examples = []
    for _ in range(count):
        scene = shapes.scenes(rng, 1)[0]
        image, box = shapes.draw_placed(scene, rng)
        task = rng.choice(("detect", "point"))
        present = rng.random() >= negatives
        shape = scene.shape if present else rng.choice([s for s in shapes.SHAPES if s != scene.shape])
        colour = scene.colour if present else rng.choice(list(shapes.COLOURS))
        phrase = shape if rng.random() < 0.5 else f"{colour} {shape}"
        template = templates[task]
        prompt = template["prefix"] + inner.tokenizer.encode(" " + phrase).ids + template["suffix"]
        examples.append((inner.pixels(image), Grounding(prompt, box if present else None, task == "detect")))
    return examples


def coordinate_bin(value: float, bins: int) -> int:
    """The bin whose value (``bin / bins``, what the code decodes) is nearest ``value``."""
    return min(max(round(value * bins), 0), bins - 1)


def size_bin(value: float, bins: int) -> int:
    """The log-scale bin nearest ``value`` (the inverse of ``moondream.size_from_bin``)."""
    return min(max(round((math.log2(max(value, 2.0**-10)) + 10.0) / 10.0 * (bins - 1)), 0), bins - 1)


def _pictures(inner, pixels: list):
    """Each image's embeddings (images, patches, dim); all crops go through the vision encoder at once."""
    import torch

    from .moondream_remote.moondream import vision_encoder, vision_projection

    c = inner.config
    features = vision_encoder(torch.cat([crops for crops, _ in pixels]), inner.vision, c.vision)
    per_image = features.split([crops.shape[0] for crops, _ in pixels])
    return torch.stack(
        [vision_projection(f, tiling, inner.vision, c.vision) for f, (_, tiling) in zip(per_image, pixels, strict=True)]
    )


def _binned_cross_entropy(logits, targets, sigma: float):
    """Cross-entropy of bin logits against ``targets``: hard with ``sigma`` 0, else against a Gaussian
    of ``sigma`` bins around each target (a bin next to the right one is nearly right)."""
    import torch
    import torch.nn.functional as F

    if not sigma:
        return F.cross_entropy(logits, targets)
    bins = torch.arange(logits.shape[-1], dtype=torch.float32)
    soft = torch.softmax(-((bins[None, :] - targets[:, None].float()) ** 2) / (2 * sigma**2), dim=-1)
    return F.cross_entropy(logits, soft)


def grounding_loss(inner, pictures, examples: list[Grounding], sigma: float = 0.0):
    """Teacher-forced, as ``_generate_points`` decodes: after BOS, the image and the prompt come the
    object's x (``encode_coordinate`` of its bin's value), y and, for detect, its size, in the places
    of ``coord_id``/``size_id`` tokens. Cross-entropy of the x bin at the prompt's last position, the y
    bin at x's, the width and height bins at y's (detect), and of the output layer's greedy token: not
    the end token at the prompt's last position (``coord_id``: an object follows), the end token after
    the object (one object per picture), the end token at once when the picture does not hold it. The
    bins' cross-entropies are against a Gaussian of ``sigma`` bins (:func:`_binned_cross_entropy`)."""
    import torch
    import torch.nn.functional as F

    from .moondream_remote.moondream import (
        decode_coordinate,
        encode_coordinate,
        encode_size,
        lm_head,
        mlp,
        size_from_bin,
        text_decoder,
    )

    c = inner.config
    tok = c.tokenizer
    coord_bins, size_bins = c.region.coord_out_dim, c.region.size_out_dim // 2
    rows, token_at, token_targets = [], [], []
    coord_at, coord_targets, size_at, size_targets = [], [], [], []
    for i, example in enumerate(examples):
        last = len(example.prompt) - 1
        if example.box is None:
            rows.append(example.prompt)
            token_at.append((i, last))
            token_targets.append(tok.eos_id)
            continue
        x_min, y_min, x_max, y_max = example.box
        center = [coordinate_bin((x_min + x_max) / 2, coord_bins), coordinate_bin((y_min + y_max) / 2, coord_bins)]
        region = [tok.coord_id, tok.coord_id] + ([tok.size_id] if example.size else [])
        rows.append(example.prompt + region)
        coord_at += [(i, last), (i, last + 1)]
        coord_targets += center
        if example.size:
            size_at.append((i, last + 2))
            size_targets.append([size_bin(x_max - x_min, size_bins), size_bin(y_max - y_min, size_bins)])
        token_at += [(i, last), (i, last + len(region))]
        token_targets += [tok.coord_id, tok.eos_id]
    width = max(map(len, rows))
    ids = torch.tensor([row + [tok.eos_id] * (width - len(row)) for row in rows])
    x = F.embedding(ids, inner.text.wte)
    # What the decode loop feeds back: each bin's decoded value, encoded.
    coords = torch.tensor(coord_targets, dtype=torch.float32) / coord_bins
    x = x.index_put((ids == tok.coord_id,), encode_coordinate(coords[:, None].to(x.dtype), inner.region))
    if size_at:
        sizes = size_from_bin(torch.tensor(size_targets), size_bins).to(x.dtype)
        x = x.index_put((ids == tok.size_id,), encode_size(sizes, inner.region))
    batch, patches, dim = pictures.shape
    bos = inner.text.wte[tok.bos_id].expand(batch, 1, dim)
    x = torch.cat([bos, pictures, x], dim=1)
    length = x.shape[1]
    hidden = text_decoder(x, inner.text, inner.attn_mask[:, :, :length, :length], torch.arange(length), c.text, False)
    hidden = hidden[:, 1 + patches :]

    def at(places):
        rows_, cols = zip(*places, strict=True)
        return hidden[list(rows_), list(cols)]

    loss = F.cross_entropy(lm_head(at(token_at), inner.text), torch.tensor(token_targets))
    if coord_at:
        coord_logits = decode_coordinate(at(coord_at), inner.region)
        loss = loss + _binned_cross_entropy(coord_logits, torch.tensor(coord_targets), sigma)
    if size_at:
        size_logits = mlp(at(size_at), inner.region.size_decoder).view(-1, size_bins)  # width, height, ...
        loss = loss + _binned_cross_entropy(size_logits, torch.tensor(size_targets).view(-1), sigma)
    return loss


def training_loss(
    model, pixels: list, prompts: list[list[int]], answers: list[list[int]], grounding=(), sigma: float = 0.0
):
    """Teacher-forced cross-entropy of each answer (ending with the end token) after BOS, the image and
    the prompt, through the model's own vision encoder, attention mask and text decoder, plus
    :func:`grounding_loss` of ``grounding``, (pixels, Grounding) pairs. ``pixels`` holds each image's
    crops and tiling (``MoondreamModel.pixels``)."""
    import torch
    import torch.nn.functional as F

    from .moondream_remote.moondream import lm_head, text_decoder

    inner = model.model
    c = inner.config
    eos = c.tokenizer.eos_id
    pictures = _pictures(inner, list(pixels) + [example_pixels for example_pixels, _ in grounding])
    pictures, grounded = pictures[: len(pixels)], pictures[len(pixels) :]
    batch, patches, dim = pictures.shape
    rows = [prompt + answer + [eos] for prompt, answer in zip(prompts, answers, strict=True)]
    width = max(map(len, rows))
    ids = torch.tensor([row + [eos] * (width - len(row)) for row in rows])
    labels = torch.full((batch, width), -100)
    for i, (prompt, row) in enumerate(zip(prompts, rows, strict=True)):
        labels[i, len(prompt) - 1 : len(row) - 1] = ids[i, len(prompt) : len(row)]
    bos = inner.text.wte[c.tokenizer.bos_id].expand(batch, 1, dim)
    x = torch.cat([bos, pictures, F.embedding(ids, inner.text.wte)], dim=1)
    length = x.shape[1]
    hidden = text_decoder(x, inner.text, inner.attn_mask[:, :, :length, :length], torch.arange(length), c.text, False)
    logits = lm_head(hidden[:, 1 + patches :], inner.text)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    if grounding:
        loss = loss + grounding_loss(inner, grounded, [example for _, example in grounding], sigma)
    return loss


def _build(directory: Path, trained: bool = True) -> None:
    import torch

    from vlm_service.backends.remote_code import BUNDLED_HUB_CACHE, hub_cache

    from .moondream_remote.hf_moondream import HfConfig, HfMoondream

    write_tokenizer_cache(directory)
    torch.manual_seed(0)
    with hub_cache(directory / BUNDLED_HUB_CACHE):
        model = HfMoondream(HfConfig()).eval()
    initialise(model)
    if trained and TRAIN:
        from .train import LENGTHS, train

        inner = model.model
        templates = inner.config.tokenizer.templates
        names = {length: name for name, length in LENGTHS.items()}
        grounding_rng = random.Random(GROUNDING["seed"])  # batches are made in order: deterministic

        def make_batch(pairs, grounded: bool = False):
            pixels = [inner.pixels(request.image) for request, _ in pairs]
            prompts = [
                templates["query"]["prefix"]
                + inner.tokenizer.encode(request.question).ids
                + templates["query"]["suffix"]
                if request.question
                else templates["caption"][names[request.length]]
                for request, _ in pairs
            ]
            answers = [inner.tokenizer.encode(" " + answer).ids for _, answer in pairs]
            if not grounded:
                return pixels, prompts, answers
            grounding = grounding_examples(inner, grounding_rng, GROUNDING["per_batch"], GROUNDING["negatives"])
            return pixels, prompts, answers, grounding

        def loss_of(batch):
            return training_loss(model, *batch, sigma=GROUNDING["sigma"])

        train(model, make_batch, loss_of, **TRAIN)
        if GROUNDING["per_batch"]:
            train(model, lambda pairs: make_batch(pairs, grounded=True), loss_of, **GROUNDING["train"])
    save(model, directory, {name: REMOTE_DIR / name for name in REMOTE_FILES})


@functools.cache
def build_inputs(trained: bool = True) -> BuildInputs:
    """What the build depends on (its cache key): this module, the remote code it writes and the
    tokenizer's code; trained, also the training code and the recipes. (Its prompts are the remote
    code's templates, in its sources.)"""
    remote = tuple(f"{__package__}.moondream_remote.{Path(name).stem}" for name in REMOTE_FILES)
    sources = (__name__, *remote, *TOKENIZER_SOURCES)
    if not (trained and TRAIN):
        return BuildInputs(sources=sources)
    return BuildInputs(sources=(*sources, *TRAINING_SOURCES), recipe={"train": TRAIN, "grounding": GROUNDING})


def ensure_tiny_moondream(cache_dir: Path, trained: bool = True) -> Path:
    """Return the directory of the tiny Moondream checkpoint: cached, shipped, or built now."""
    return ensure_checkpoint(cache_dir, "tiny-moondream", _build, trained, inputs=build_inputs)
