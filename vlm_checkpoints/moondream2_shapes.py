"""``moondream2-shapes``: a real-size twin of Moondream2 (revision 2025-06-21) with random weights.

It is built through the project's own remote code (``moondream_remote/``, the code ``tiny-moondream``
ships) with a generated ``sizes.py`` holding Moondream2's published configuration defaults and its
bfloat16 weights, so the service loads it exactly as it loads the published model (remote code whose
sizes and dtype come from the code, tokenizer read by repo name from the checkpoint's hub cache). It is
for benchmarks and real-size smoke tests, not accuracy: what it writes is noise.

What cannot be the published model's here: the tokenizer is tiny-moondream's (1,024 tokens; the output
layer keeps the published 51,200 rows, those past the tokenizer silenced), and the vision crops are
tiled without the published overlap margin.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from .builder import build_cached
from .twins import is_whole_printable

logger = logging.getLogger(__name__)

NAME = "moondream2-shapes"
#: Moondream2's published configuration defaults (``moondream/torch/config.py`` at revision 2025-06-21).
TEXT = {
    "dim": 2048,
    "ff_dim": 8192,
    "n_layers": 24,
    "vocab_size": 51200,
    "max_context": 2048,
    "n_heads": 32,
    "n_kv_heads": 32,
}
VISION = {
    "enc_dim": 1152,
    "enc_patch_size": 14,
    "enc_n_layers": 27,
    "enc_ff_dim": 4304,
    "enc_n_heads": 16,
    "proj_out_dim": 2048,
    "crop_size": 378,
    "max_crops": 12,
    "proj_inner_dim": 8192,
}
REGION = {
    "dim": 2048,
    "coord_feat_dim": 256,
    "coord_out_dim": 1024,
    "size_feat_dim": 512,
    "size_out_dim": 2048,
    "inner_dim": 8192,
}


def sizes_source() -> str:
    """The ``sizes.py`` the twin ships: the published figures, weights in bfloat16."""
    return (
        '"""Moondream2\'s published sizes (revision 2025-06-21); weights in bfloat16, as published."""\n\n'
        "import torch\n\n"
        "DTYPE = torch.bfloat16\n"
        f"TEXT = {TEXT!r}\n"
        f"VISION = {VISION!r}\n"
        f"REGION = {REGION!r}\n"
    )


def silenced_ids(tokenizer, vocab_size: int) -> list[int]:
    """Ids the twin must never write: special tokens (the end token too, so it writes to the asked
    length), ids past the tokenizer, tokens that alone do not decode to whole printable text
    (``twins.unprintable_ids`` does the same for a transformers tokenizer; this model's is a
    ``tokenizers.Tokenizer``, and its output layer has a bias to push them down with), and tokens that
    do not start a word. Moondream's code sends text only up to the last space, so a twin writing
    word pieces without spaces would send its whole answer at the end; writing whole words, it streams
    one word per decode step, as the published model streams its words."""
    special = set(tokenizer.get_added_tokens_decoder())
    known = min(tokenizer.get_vocab_size(), vocab_size)

    def writable(text: str) -> bool:
        return is_whole_printable(text) and text.startswith(" ") and bool(text.strip())

    silenced = [i for i in range(known) if i in special or not writable(tokenizer.decode([i]))]
    return silenced + list(range(known, vocab_size))


def randomise(model, seed: int = 0) -> None:
    """Seeded random weights (LayerNorms at identity), as a freshly initialised model would have."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".ln" in name or "post_ln" in name:
                parameter.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                parameter.zero_()
            else:
                std = math.sqrt(1 / parameter.shape[-1]) if name.endswith("pos_emb") else 0.02
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


def _build(directory: Path) -> None:
    import shutil

    import torch
    from transformers.dynamic_module_utils import get_class_from_dynamic_module
    from transformers.initialization import no_init_weights

    from vlm_service.backends.remote_code import BUNDLED_HUB_CACHE, hub_cache

    from .tiny_moondream import REMOTE_DIR, save, write_tokenizer_cache

    write_tokenizer_cache(directory)
    for name in ("hf_moondream.py", "moondream.py", "config.py"):
        shutil.copyfile(REMOTE_DIR / name, directory / name)
    (directory / "sizes.py").write_text(sizes_source())
    # Built by the code it ships with, as the service will build it.
    model_class = get_class_from_dynamic_module("hf_moondream.HfMoondream", str(directory))
    with hub_cache(directory / BUNDLED_HUB_CACHE), no_init_weights():
        model = model_class(model_class.config_class()).eval()
    randomise(model)
    inner = model.model
    silenced = silenced_ids(inner.tokenizer, inner.config.text.vocab_size)
    with torch.no_grad():
        inner.text.lm_head.bias[silenced] = -1e4
    logger.info(
        "%s: %d parameters, %d output rows silenced", NAME, sum(p.numel() for p in model.parameters()), len(silenced)
    )
    save(model, directory, {})


def ensure_moondream2_shapes(cache_dir: Path) -> Path:
    """The twin's directory, built on first use (about 3.9 GB of bfloat16 weights)."""
    return build_cached(cache_dir, NAME, _build)
