"""``tiny-moondream``: a tiny local *remote-code* checkpoint that behaves as Moondream2's published code.

The directory holds ``config.json`` (whose ``auto_map`` points at ``hf_moondream.py``), the remote code
(``moondream_remote/``: ``hf_moondream.py``, ``moondream.py``, ``config.py``, ``sizes.py``), the weights,
and ``hf-cache/``, a Hugging Face hub cache holding the tokenizer under the repo name the code loads it
by (``Tokenizer.from_pretrained``), as Moondream2's code loads ``moondream/starmie-v1``. The model is
trained on the synthetic shapes through the very prompt templates its ``caption``/``query`` use.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from .builder import ensure_checkpoint, train_byte_level_bpe
from .corpus import tokenizer_corpus

REMOTE_DIR = Path(__file__).parent / "moondream_remote"
REMOTE_FILES = ("hf_moondream.py", "moondream.py", "config.py", "sizes.py")
AUTO_MAP = {"AutoConfig": "hf_moondream.HfConfig", "AutoModelForCausalLM": "hf_moondream.HfMoondream"}
#: Training on the synthetic shapes; empty means random weights.
TRAIN = {"steps": 2000, "distinct_batches": 300, "lr": 3e-3}


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


def training_loss(model, pixels: list, prompts: list[list[int]], answers: list[list[int]]):
    """Teacher-forced cross-entropy of each answer (ending with the end token) after BOS, the image and
    the prompt, through the model's own vision encoder, attention mask and text decoder. ``pixels``
    holds each image's crops and tiling (``MoondreamModel.pixels``); all crops go through the vision
    encoder at once."""
    import torch
    import torch.nn.functional as F

    from .moondream_remote.moondream import lm_head, text_decoder, vision_encoder, vision_projection

    inner = model.model
    c = inner.config
    eos = c.tokenizer.eos_id
    features = vision_encoder(torch.cat([crops for crops, _ in pixels]), inner.vision, c.vision)
    per_image = features.split([crops.shape[0] for crops, _ in pixels])
    pictures = torch.stack(
        [vision_projection(f, tiling, inner.vision, c.vision) for f, (_, tiling) in zip(per_image, pixels, strict=True)]
    )
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
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


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

        def make_batch(pairs):
            pixels = [inner.pixels(request.image) for request, _ in pairs]
            prompts = [
                templates["query"]["prefix"]
                + inner.tokenizer.encode(request.question).ids
                + templates["query"]["suffix"]
                if request.question
                else templates["caption"][names[request.length]]
                for request, _ in pairs
            ]
            return pixels, prompts, [inner.tokenizer.encode(" " + answer).ids for _, answer in pairs]

        train(model, make_batch, lambda batch: training_loss(model, *batch), **TRAIN)
    save(model, directory, {name: REMOTE_DIR / name for name in REMOTE_FILES})


def ensure_tiny_moondream(cache_dir: Path, trained: bool = True) -> Path:
    """Return the directory of the tiny Moondream checkpoint, building it on first use."""
    return ensure_checkpoint(cache_dir, "tiny-moondream", _build, trained)
