"""Shared machinery for building tiny checkpoints offline: tokenizer training and atomic caching."""

from __future__ import annotations

import functools
import hashlib
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
    Tokens are at most 6 bytes long, so that, as with the real models' large vocabularies, a token
    carries a word piece or one or two CJK characters, never a whole sentence of a spaceless script.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        max_token_length=6,
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return tokenizer


def source_digest() -> str:
    """A digest of the code that decides what a tiny checkpoint contains (its builder, corpus, training
    data, and the prompts and encoding of the backends it is trained through): change any of it and the
    checkpoints are built anew, never reused stale from the cache."""
    package = Path(__file__).resolve().parents[1]
    trained_through = [package / "backends" / name for name in ("hf.py", "smolvlm.py", "qwen2_vl.py")]
    digest = hashlib.sha256()
    for path in sorted([*package.glob("checkpoints/**/*.py"), *trained_through, package / "types.py"]):
        digest.update(path.relative_to(package).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


def ensure_checkpoint(cache_dir: Path, name: str, build: Callable[..., None], trained: bool = True) -> Path:
    """The tiny checkpoint ``name``, trained on the shapes, or with ``trained=False`` its random-weights
    twin (it writes noise and seldom ends its answer: what tests of long generations need)."""
    if trained:
        return build_cached(cache_dir, name, build)
    return build_cached(cache_dir, f"{name}-random", functools.partial(build, trained=False))


def build_cached(cache_dir: Path, name: str, build: Callable[[Path], None]) -> Path:
    """Build checkpoint ``name`` into ``cache_dir`` once; concurrent builders race safely.

    The checkpoint is written to a temporary directory beside its target and renamed into place, so a
    reader never sees a half-written checkpoint, and a failed build leaves nothing behind.
    """
    target = Path(cache_dir) / f"{name}-{source_digest()}"
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
