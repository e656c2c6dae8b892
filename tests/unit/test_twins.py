"""Silencing a random model's unprintable rows (vlm_checkpoints/twins.py), on a small random Llama."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from vlm_checkpoints.builder import train_byte_level_bpe
from vlm_checkpoints.corpus import tokenizer_corpus
from vlm_checkpoints.twins import (
    check_prompts_end_kept,
    is_whole_printable,
    silence_unprintable_rows,
    unprintable_ids,
)

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB = 1_200  # the tokenizer stops below it: the model's rows beyond the tokenizer are padding


@pytest.fixture(scope="module")
def tokenizer():
    backend = train_byte_level_bpe(tokenizer_corpus(), SPECIAL, vocab_size=1_000)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>"
    )


def random_llama(tied: bool, layers: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config).eval()


def test_whole_printable_text():
    assert is_whole_printable("red") and is_whole_printable(" 赤") and is_whole_printable("\n")
    assert not is_whole_printable("")
    assert not is_whole_printable("\ufffd")
    assert not is_whole_printable("\x00") and not is_whole_printable("\x1b[0m")


def test_unprintable_ids(tokenizer):
    silenced = set(unprintable_ids(tokenizer, VOCAB))
    byte_of_a_cjk_character = tokenizer.convert_tokens_to_ids("ã")  # 0xE3: the first byte of 赤
    assert byte_of_a_cjk_character in silenced
    assert set(tokenizer.all_special_ids) <= silenced
    assert set(range(len(tokenizer), VOCAB)) <= silenced
    words = tokenizer(" red circle", add_special_tokens=False)["input_ids"]
    assert not silenced & set(words)
    assert tokenizer.eos_token_id not in unprintable_ids(tokenizer, VOCAB, keep=[tokenizer.eos_token_id])
    # Every kept token decodes alone to whole printable text.
    kept = [i for i in range(len(tokenizer)) if i not in silenced]
    assert len(kept) > 200
    assert all(is_whole_printable(tokenizer.decode([i])) for i in kept)


def prompts(tokenizer, silenced, count: int = 32, length: int = 24) -> torch.Tensor:
    """Random prompts that end in a kept token (specials and fragments inside them, as in real prompts)."""
    generator = torch.Generator().manual_seed(1)
    rows = torch.randint(0, len(tokenizer), (count, length), generator=generator)
    kept = torch.tensor([i for i in range(len(tokenizer)) if i not in set(silenced)])
    rows[:, -1] = kept[torch.randint(0, len(kept), (count,), generator=generator)]
    return rows


@pytest.mark.parametrize("tied", [True, False])
def test_silenced_rows_fall_far_below_the_kept_ones(tokenizer, tied):
    model = random_llama(tied)
    input_ids = prompts(tokenizer, unprintable_ids(tokenizer, VOCAB))
    with torch.no_grad():
        before = model(input_ids).logits[:, -1]
    silenced = silence_unprintable_rows(model, tokenizer)
    kept = [i for i in range(VOCAB) if i not in set(silenced)]
    with torch.no_grad():
        after = model(input_ids).logits[:, -1]
    # Before, the random model's best token is often a silenced one; after, never, by a wide margin.
    assert (torch.isin(before.argmax(-1), torch.tensor(silenced))).any()
    margin = after[:, kept].min(-1).values - after[:, silenced].max(-1).values
    spread = after[:, kept].std(-1)
    assert (margin > 10 * spread).all(), (margin / spread).min()


@pytest.mark.parametrize("tied", [True, False])
def test_a_silenced_model_writes_whole_printable_text_to_the_asked_length(tokenizer, tied):
    model = random_llama(tied, layers=2)
    silenced = silence_unprintable_rows(model, tokenizer)
    input_ids = prompts(tokenizer, silenced, count=4)
    for do_sample in (False, True):
        torch.manual_seed(2)
        output = model.generate(
            input_ids,
            max_new_tokens=48,
            min_new_tokens=0,
            do_sample=do_sample,
            temperature=1.5 if do_sample else None,
            top_k=0 if do_sample else None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.eos_token_id,
        )
        written = output[:, input_ids.shape[1] :]
        assert written.shape[1] == 48  # the end token is silenced too: never an early end
        assert not torch.isin(written, torch.tensor(silenced)).any()
        for row in written.tolist():
            assert is_whole_printable(tokenizer.decode(row))


def test_an_output_bias_silences_through_the_bias(tokenizer):
    model = random_llama(tied=False, layers=2)
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(VOCAB))
    weights = model.lm_head.weight.detach().clone()
    silenced = silence_unprintable_rows(model, tokenizer)
    assert torch.equal(model.lm_head.weight, weights)
    input_ids = prompts(tokenizer, silenced)
    with torch.no_grad():
        logits = model(input_ids).logits[:, -1]
    kept = [i for i in range(VOCAB) if i not in set(silenced)]
    assert (logits[:, kept].min(-1).values > logits[:, silenced].max(-1).values + 1_000).all()


def test_a_prompt_that_ends_in_a_silenced_token_is_refused(tokenizer):
    silenced = unprintable_ids(tokenizer, VOCAB)
    check_prompts_end_kept(tokenizer, ["<|im_start|>user\nDescribe this image.<|im_end|>\nAssistant:"], silenced)
    with pytest.raises(ValueError, match="ends in a silenced token"):
        check_prompts_end_kept(tokenizer, ["<|im_start|>assistant<|im_end|>"], silenced)


def test_build_makes_the_tiny_checkpoints_by_default_and_a_twin_only_when_named(monkeypatch, tmp_path):
    from dataclasses import replace

    from vlm_service import cli
    from vlm_service.backends import catalogue

    built = []

    def recorder(name):
        def build(cache_dir, *trained):
            built.append((name, *trained))
            return tmp_path / name

        return build

    builtins = {
        name: replace(builtin, build=recorder(name)) if builtin.build else builtin
        for name, builtin in catalogue.BUILTINS.items()
    }
    monkeypatch.setattr(catalogue, "BUILTINS", builtins)
    assert cli.main(["build", "--random-twins", "--cache-dir", str(tmp_path)]) == 0
    tiny = [name for name, builtin in builtins.items() if builtin.build and not builtin.twin]
    assert built == [(name, trained) for name in tiny for trained in (True, False)]
    assert {"smolvlm-256m-shapes", "qwen2-vl-2b-shapes", "moondream2-shapes"} <= {
        n for n, b in builtins.items() if b.twin
    }
    built.clear()
    assert cli.main(["build", "smolvlm-256m-shapes", "--random-twins", "--cache-dir", str(tmp_path)]) == 0
    assert built == [("smolvlm-256m-shapes",)]
