"""``smolvlm-256m-shapes``: SmolVLM-256M-Instruct's shapes with random weights, built offline.

The published ``HuggingFaceTB/SmolVLM-256M-Instruct``: a SigLIP base patch-16 vision tower at 512 px
(hidden 768, 12 layers, 12 heads, MLP 3072), a pixel shuffle of scale factor 4 (64 image tokens per
512-px tile), the SmolLM2-135M text model (hidden 576, 30 layers, 9 heads, 3 KV heads, MLP 1536,
vocabulary 49,280, RoPE theta 100,000, 8,192 positions) whose output layer is *not* tied to its
embeddings (SmolLM2-135M alone ties them; the published SmolVLM config says ``"tie_word_embeddings":
false``, which is where the 256M of the name comes from: 228M tied, 256.5M untied), and a processor that resizes a
picture to a 2,048-px longest edge and splits it into 512-px tiles plus a global view (a square picture
is 16 tiles + 1, about 1,160 prompt tokens). Saved in bfloat16, as the published checkpoint is.

The tokenizer is a byte-level BPE trained with ``tokenizers`` on the project's corpus: it has fewer
tokens than the published one, and the model's 49,280 rows are the published vocabulary size (rows
beyond the tokenizer are never written, see ``twins.py``).
"""

from __future__ import annotations

from pathlib import Path

from .builder import build_cached, train_byte_level_bpe
from .corpus import tokenizer_corpus
from .tiny_smolvlm import CHAT_TEMPLATE, SPECIAL_TOKENS

NAME = "smolvlm-256m-shapes"
VOCAB = 49_280
TILE = 512
LONGEST_EDGE = 2_048
PATCH = 16
SCALE_FACTOR = 4
IMAGE_SEQ_LEN = (TILE // PATCH) ** 2 // SCALE_FACTOR**2  # 64


def _build(directory: Path) -> None:
    import torch
    from transformers import (
        LlamaConfig,
        PreTrainedTokenizerFast,
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessor,
        SmolVLMProcessor,
        SmolVLMVideoProcessor,
    )
    from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig

    from vlm_service.backends.smolvlm import SmolVLMBackend

    from .twins import check_prompts_end_kept, save_twin, service_prompts, silence_unprintable_rows

    backend = train_byte_level_bpe(tokenizer_corpus(), SPECIAL_TOKENS, vocab_size=VOCAB)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
        clean_up_tokenization_spaces=False,
        model_max_length=8_192,
    )
    ids = {token: backend.token_to_id(token) for token in SPECIAL_TOKENS}
    image_processor = SmolVLMImageProcessor(
        size={"longest_edge": LONGEST_EDGE},
        max_image_size={"longest_edge": TILE},
        do_image_splitting=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    video_processor = SmolVLMVideoProcessor(size={"longest_edge": TILE}, max_image_size={"longest_edge": TILE})
    processor = SmolVLMProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        image_seq_len=IMAGE_SEQ_LEN,
        chat_template=CHAT_TEMPLATE,
    )
    text_config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=576,
        intermediate_size=1_536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        max_position_embeddings=8_192,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100_000.0},
        hidden_act="silu",
        tie_word_embeddings=False,
        bos_token_id=ids["<|im_start|>"],
        eos_token_id=ids["<end_of_utterance>"],
        pad_token_id=ids["<|im_end|>"],
    )
    vision_config = SmolVLMVisionConfig(
        hidden_size=768,
        intermediate_size=3_072,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_channels=3,
        image_size=TILE,
        patch_size=PATCH,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
    )
    config = SmolVLMConfig(
        text_config=text_config.to_dict(),
        vision_config=vision_config.to_dict(),
        scale_factor=SCALE_FACTOR,
        image_token_id=ids["<image>"],
        pad_token_id=ids["<|im_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = SmolVLMForConditionalGeneration._from_config(config, dtype=torch.bfloat16).eval()
    for key, token in (("bos_token_id", "<|im_start|>"), ("eos_token_id", "<end_of_utterance>")):
        setattr(model.generation_config, key, ids[token])
    model.generation_config.pad_token_id = ids["<|im_end|>"]
    silenced = silence_unprintable_rows(model, tokenizer)
    check_prompts_end_kept(tokenizer, service_prompts(SmolVLMBackend.around(model, processor)), silenced)
    save_twin(model, processor, directory)


def ensure_smolvlm_256m_shapes(cache_dir: Path) -> Path:
    """Return the directory of the ``smolvlm-256m-shapes`` twin, building it on first use."""
    return build_cached(cache_dir, NAME, _build)
