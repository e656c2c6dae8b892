"""The tokenizer every tiny checkpoint trains: byte-level BPE on the fixed corpus, deterministic."""

from __future__ import annotations

from collections.abc import Sequence


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
