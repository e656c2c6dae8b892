"""Shared machinery for building tiny checkpoints offline: tokenizer training and atomic caching."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)


def train_byte_level_bpe(corpus: Sequence[str], special_tokens: Sequence[str], vocab_size: int):
    """Train a byte-level BPE tokenizer (GPT-2 style, like SmolVLM's and Qwen2's) on a fixed corpus.

    Byte-level means every UTF-8 byte has a token, so any text (CJK, emoji) round-trips, and a
    multi-byte character may be split over several tokens: exactly what the streamer must handle.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return tokenizer


def build_cached(target: Path, build: Callable[[Path], None]) -> Path:
    """Build a checkpoint into ``target`` once; concurrent builders race safely.

    The checkpoint is written to a temporary directory beside ``target`` and renamed into place, so a
    reader never sees a half-written checkpoint, and a failed build leaves nothing behind.
    """
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        logger.info("building checkpoint %s (offline, deterministic)", target.name)
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            # Another process finished first; its build is identical.
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
