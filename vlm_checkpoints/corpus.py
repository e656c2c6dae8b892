"""Deterministic text used to train the tiny checkpoints' tokenizers.

Everything here is generated from fixed lists, so two builds on two machines produce the same
tokenizer byte for byte. The corpus covers what the tiny models say (captions of coloured shapes) and
what the tests exercise (multi-byte scripts, emoji) so every character has byte-level tokens to stream.
"""

from __future__ import annotations

ENGLISH = (
    "A red circle on a white background.",
    "The image shows a simple shape drawn on a plain background.",
    "What colour is the shape? What shape is it? Describe this image.",
    "Describe this image in one sentence. Describe this image in detail.",
    "There is one shape in the middle of the picture, and nothing else.",
)
# Non-Latin scripts: streamed character by character, never held for a space.
MULTILINGUAL = (
    "白い背景に赤い丸があります。",
    "これは簡単な図形の画像です。",
    "白色背景上有一个红色的圆形。",
    "这是一张简单形状的图片。",
    "흰색 배경에 빨간 원이 있습니다.",
    "이것은 간단한 도형의 이미지입니다.",
    "ภาพนี้มีวงกลมสีแดง",
    "Ein roter Kreis auf weißem Hintergrund. Café, naïve, déjà vu.",
    "Emoji: 🔴🟢🔵 ✅ 👍🏽 🎉",
)


def tokenizer_corpus() -> list[str]:
    """The full, ordered training corpus for the tiny tokenizers."""
    from .shapes import all_texts

    # Repeat the demo sentences so that the merges favour the words the models actually say.
    return list(ENGLISH) + list(MULTILINGUAL) + all_texts() * 3
