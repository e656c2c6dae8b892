"""The streamer bridge: per-token delivery, UTF-8 safety, stop strings, clean deltas."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from vlm_service.backends.detokenizer import IncrementalDetokenizer
from vlm_service.core.text import TextAssembler, clean_answer


@pytest.fixture(scope="module")
def tokenizer(tiny_smolvlm_dir):
    return AutoTokenizer.from_pretrained(tiny_smolvlm_dir)


def stream_ids(tokenizer, ids):
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add_token(i) for i in ids]
    return pieces, detok.finish()


@pytest.mark.parametrize(
    "text",
    [
        "A red circle on a white background.",
        "白い背景に赤い丸があります。",
        "Emoji: 🔴🟢🔵 ✅ 👍🏽 🎉",
        "흰색 배경에 빨간 원",
        "ภาพนี้มีวงกลมสีแดง",
    ],
)
def test_concatenation_equals_decode(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces, tail = stream_ids(tokenizer, ids)
    assert "".join(pieces) + tail == tokenizer.decode(ids, skip_special_tokens=True) == text


def test_multibyte_characters_are_never_split(tokenizer):
    text = "🔴赤い丸👍🏽"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text), "the byte-level tokenizer should split some characters over several tokens"
    pieces, tail = stream_ids(tokenizer, ids)
    assert tail == ""
    for piece in pieces:
        assert "\ufffd" not in piece
        piece.encode("utf-8")  # a lone surrogate or partial character would fail here


def test_text_without_spaces_streams_per_character(tokenizer):
    """Japanese has no spaces: each character must leave as soon as its last byte is decoded."""
    text = "これは簡単な図形の画像です"
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces, _ = stream_ids(tokenizer, ids)
    non_empty = [p for p in pieces if p]
    assert len(non_empty) >= len(ids) // 3, f"text came in bursts: {non_empty}"
    # Every token that completes a character releases it at that step, not later.
    decoded_so_far = ""
    for k, piece in enumerate(pieces):
        decoded_so_far += piece
        full_prefix = tokenizer.decode(ids[: k + 1], skip_special_tokens=True)
        assert decoded_so_far == full_prefix.rstrip("\ufffd")


def test_special_tokens_are_skipped(tokenizer):
    ids = tokenizer.encode("red", add_special_tokens=False) + [tokenizer.eos_token_id]
    pieces, tail = stream_ids(tokenizer, ids)
    assert "".join(pieces) + tail == "red"
    assert pieces[-1] == ""


def test_invalid_byte_sequences_are_flushed_at_the_end(tokenizer):
    """A model may emit bytes that never form a character; the stream still equals the full decode."""
    byte_tokens = [
        i
        for i in range(tokenizer._tokenizer.get_vocab_size())
        if len(tokenizer.decode([i])) == 1 and tokenizer.decode([i]) == "\ufffd"
    ]
    assert byte_tokens, "the tokenizer should have lone-byte tokens"
    ids = tokenizer.encode("red ", add_special_tokens=False) + byte_tokens[:3]
    pieces, tail = stream_ids(tokenizer, ids)
    assert "".join(pieces) + tail == tokenizer.decode(ids, skip_special_tokens=True)
    assert tail  # the invalid bytes arrive at the end, as replacement characters


@given(st.lists(st.integers(min_value=0, max_value=1023), max_size=40))
@settings(max_examples=200, deadline=None)
def test_any_token_sequence_round_trips(tokenizer, ids):
    pieces, tail = stream_ids(tokenizer, ids)
    assert all(p is not None for p in pieces)
    assert "".join(pieces) + tail == tokenizer.decode(ids, skip_special_tokens=True)


# --- TextAssembler ---------------------------------------------------------------------------


ROLES = ("assistant\n", "Assistant:")


def assemble(pieces, stop=(), roles=()):
    assembler = TextAssembler(stop, roles)
    deltas = [assembler.push(p) for p in pieces]
    deltas.append(assembler.finish())
    return deltas, assembler


def test_assembler_passes_text_through_immediately():
    deltas, _ = assemble(["A", " red", " circle", "."])
    assert deltas == ["A", " red", " circle", ".", ""]


def test_assembler_strips_leading_and_trailing_whitespace():
    deltas, _ = assemble(["  ", " A", " red ", "\n", " circle", "  \n"])
    assert "".join(deltas) == "A red \n circle"
    assert deltas[0] == "" and deltas[1] == "A"


def test_stop_string_across_pieces_is_cut_and_never_sent():
    deltas, assembler = assemble(["A red", " ci", "rcle. Ano", "ther"], stop=["circle"])
    assert "".join(deltas) == "A red"
    assert assembler.stopped
    assert all("ci" not in d for d in deltas)


def test_text_that_only_looks_like_a_stop_prefix_is_released():
    deltas, assembler = assemble(["A ci", "ty."], stop=["circle"])
    assert deltas[0] == "A"  # " ci" is held: it could still become "circle"
    assert "".join(deltas) == "A city."
    assert not assembler.stopped


def test_a_leading_role_word_is_removed_once():
    deltas, _ = assemble(["\n Assi", "stant", ":", " A red", " circle. Assistant: again"], roles=ROLES)
    assert "".join(deltas) == "A red circle. Assistant: again"
    assert deltas[1] == deltas[2] == "", "text that may still be a role word is held"
    deltas, _ = assemble(["Assist", "ants help."], roles=ROLES)
    assert "".join(deltas) == "Assistants help."
    deltas, _ = assemble(["assistant\n", "赤い"], roles=ROLES)
    assert deltas == ["", "赤い", ""]


@given(
    st.lists(
        st.sampled_from(["a", "b", " ", "\n", ".", "x", "赤", "Assistant", "assistant:", "Assist", "ant\n", ":"]),
        max_size=14,
    ),
    st.lists(st.text(alphabet="ab .x赤", min_size=1, max_size=3), max_size=3),
)
@settings(max_examples=500, deadline=None)
@example(["Assistant", ":"], [])
@example([".", "a", "a"], ["a", ".aa"])  # the stop that completes first wins, not the one starting first
def test_assembled_stream_equals_clean_answer(pieces, stop):
    deltas, assembler = assemble(pieces, stop, ROLES)
    expected, stopped = clean_answer("".join(pieces), stop, ROLES)
    assert "".join(deltas) == expected
    assert assembler.stopped == stopped


def test_work_per_token_does_not_grow_with_the_answer(tokenizer):
    """Each step decodes a small window, never the whole answer so far."""
    text = " ".join(["A red circle on a white background. 白い背景に赤い丸があります。"] * 60)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > 1000
    detok = IncrementalDetokenizer(tokenizer)
    windows = []
    original = detok._decode
    detok._decode = lambda window: windows.append(len(window)) or original(window)
    pieces = [detok.add_token(i) for i in ids]
    assert "".join(pieces) + detok.finish() == text
    assert max(windows) <= 8, f"a step decoded {max(windows)} tokens"
