"""``qwen2-vl-2b-shapes``: Qwen2-VL-2B-Instruct's shapes with random weights, built offline.

From the published configuration of ``Qwen/Qwen2-VL-2B-Instruct`` (``config.json`` and
``preprocessor_config.json``): a Qwen2-1.5B text model (hidden 1,536, 28 layers, 12 heads, 2 KV heads,
MLP 8,960, vocabulary 151,936, tied embeddings, RMSNorm eps 1e-6, RoPE theta 1,000,000 with M-RoPE
sections 16/24/24, 32,768 positions) and the 675M-parameter vision tower (32 layers, width 1,280,
16 heads, MLP ratio 4, patch 14, temporal patch 2, 2x2 patch merger into the text width); the image
processor keeps a picture between 3,136 and 12,845,056 pixels (4 to 16,384 merged tokens), in
28-pixel steps. Saved in bfloat16, as the published checkpoint is (about 4.4 GB): build it once, when
the machine has the memory to spare.

The tokenizer is a byte-level BPE trained with ``tokenizers`` on the project's corpus: it has fewer
tokens than Qwen's 151,643 and its special tokens have other ids; the model's rows are the published
vocabulary size (rows beyond the tokenizer are never written, see ``twins.py``).
"""

from __future__ import annotations

from pathlib import Path

from .builder import build_cached, train_byte_level_bpe
from .corpus import tokenizer_corpus
from .tiny_qwen2_vl import CHAT_TEMPLATE, SPECIAL_TOKENS

NAME = "qwen2-vl-2b-shapes"
VOCAB = 151_936
PATCH = 14
MERGE = 2
MIN_PIXELS = 3_136
MAX_PIXELS = 12_845_056


def _build(directory: Path) -> None:
    import torch
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    from vlm_service.backends.qwen2_vl import Qwen2VLBackend

    from .twins import check_prompts_end_kept, save_twin, service_prompts, silence_unprintable_rows

    backend = train_byte_level_bpe(tokenizer_corpus(), SPECIAL_TOKENS, vocab_size=VOCAB)
    ids = {token: backend.token_to_id(token) for token in SPECIAL_TOKENS}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=SPECIAL_TOKENS[1:],
        clean_up_tokenization_spaces=False,
        model_max_length=32_768,
    )
    size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, patch_size=PATCH, temporal_patch_size=2, merge_size=MERGE),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(patch_size=PATCH, temporal_patch_size=2, merge_size=MERGE),
        chat_template=CHAT_TEMPLATE,
    )
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": VOCAB,
            "hidden_size": 1_536,
            "intermediate_size": 8_960,
            "num_hidden_layers": 28,
            "num_attention_heads": 12,
            "num_key_value_heads": 2,
            "hidden_act": "silu",
            "max_position_embeddings": 32_768,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
            "tie_word_embeddings": True,
            "use_sliding_window": False,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 32,
            "embed_dim": 1_280,
            "hidden_size": 1_536,
            "num_heads": 16,
            "mlp_ratio": 4,
            "in_channels": 3,
            "patch_size": PATCH,
            "spatial_merge_size": MERGE,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16).eval()
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.bos_token_id = ids["<|endoftext|>"]
    silenced = silence_unprintable_rows(model, tokenizer)
    check_prompts_end_kept(tokenizer, service_prompts(Qwen2VLBackend.around(model, processor)), silenced)
    save_twin(model, processor, directory)


def ensure_qwen2_vl_2b_shapes(cache_dir: Path) -> Path:
    """Return the directory of the ``qwen2-vl-2b-shapes`` twin, building it on first use."""
    return build_cached(cache_dir, NAME, _build)
