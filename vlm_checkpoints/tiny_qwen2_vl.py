"""``tiny-qwen2-vl``: a tiny checkpoint of the real Qwen2-VL architecture, built offline.

A real ``Qwen2VLForConditionalGeneration`` (M-RoPE, the windowless vision tower, the patch merger) with
a real ``Qwen2VLProcessor``: its image processor with small pixel bounds (so an image becomes 4 to 16
vision tokens), its video processor, a byte-level BPE tokenizer with Qwen's special tokens, and
Qwen2-VL's chat template with vision tokens. Deterministic build, no network: trained briefly on the
synthetic shapes (captions and questions in four languages, then Detect: boxes in Qwen2-VL's format on
pictures with the shape anywhere), or random weights for the ``-random`` twin.
"""

from __future__ import annotations

import functools
from pathlib import Path

from .builder import TOKENIZER_SOURCES, TRAINING_SOURCES, BuildInputs, ensure_checkpoint, train_byte_level_bpe
from .corpus import tokenizer_corpus

# The chat template of Qwen/Qwen2-VL-2B-Instruct.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: Training on the synthetic shapes in four languages (English half the time), ``detect`` of it grounding
#: (Detect: the shape anywhere in the picture, answered with its box in Qwen2-VL's format); then more
#: grounding, ``GROUNDING``, with captions and questions beside it (what the first part taught, kept).
#: Empty means random weights.
TRAIN = {
    "steps": 1200,
    "distinct_batches": 400,
    "lr": 4e-3,
    "languages": ("en", "en", "en", "ja", "zh", "ko"),
    "detect": 0.3,
}
GROUNDING = {**TRAIN, "steps": 4000, "lr": 2e-3, "detect": 0.8, "seed": 1}
#: The text model's RoPE base. Qwen2-VL-2B's 1e6 suits its 128-wide heads; in these 16-wide ones M-RoPE's
#: sections [2, 3, 3] leave the height and the width the lowest frequencies, which at 1e6 turn less than a
#: thousandth of a radian across a picture: where a vision token lies is invisible and the model cannot
#: learn to ground. At 10 they turn up to a radian.
ROPE_THETA = 10.0

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    # Grounding: the phrase referred to, and its box "(x1,y1),(x2,y2)" in 0..1000 (see DETECT_PROMPT).
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

PATCH = 14
MERGE = 2
MIN_PIXELS = (PATCH * MERGE) ** 2 * 4  # at least 2x2 merged tokens
MAX_PIXELS = (PATCH * MERGE) ** 2 * 16  # at most 16 merged tokens


def _processor():
    """The processor (tokenizer trained on the fixed corpus, image and video processors, chat template),
    the ids of the special tokens, and the vocabulary size."""
    from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    backend = train_byte_level_bpe(tokenizer_corpus(), SPECIAL_TOKENS, vocab_size=1024)
    ids = {token: backend.token_to_id(token) for token in SPECIAL_TOKENS}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=SPECIAL_TOKENS[1:],
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, patch_size=PATCH, merge_size=MERGE),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(size=size, patch_size=PATCH, merge_size=MERGE),
        chat_template=CHAT_TEMPLATE,
    )
    return processor, ids, backend.get_vocab_size()


def _build(directory: Path, trained: bool = True) -> None:
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    processor, ids, vocab_size = _processor()
    hidden, heads = 64, 4
    head_dim = hidden // heads
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": hidden,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": heads,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA, "mrope_section": [2, 3, 3]},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 2,
            "embed_dim": 64,
            "hidden_size": hidden,
            "num_heads": 4,
            "mlp_ratio": 2,
            "patch_size": PATCH,
            "spatial_merge_size": MERGE,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    assert sum(config.text_config.rope_parameters["mrope_section"]) == head_dim // 2
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.bos_token_id = ids["<|endoftext|>"]
    if trained and TRAIN:
        from vlm_service.backends.qwen2_vl import Qwen2VLBackend

        from .train import train_transformers_vlm

        backend = Qwen2VLBackend.around(model, processor)
        train_transformers_vlm(backend, **TRAIN)
        if GROUNDING:
            train_transformers_vlm(backend, **GROUNDING)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


def _probe() -> list:
    from vlm_service.backends.qwen2_vl import Qwen2VLBackend

    from .train import probe_transformers_vlm

    processor, _, _ = _processor()
    return probe_transformers_vlm(Qwen2VLBackend.around(None, processor), **(GROUNDING or TRAIN))


@functools.cache
def build_inputs(trained: bool = True) -> BuildInputs:
    """What the build depends on (its cache key): this module and the tokenizer's code; trained, also
    the training code, the recipe, and the prompts and token ids of the probe requests."""
    if not (trained and TRAIN):
        return BuildInputs(sources=(__name__, *TOKENIZER_SOURCES))
    return BuildInputs(
        sources=(__name__, *TOKENIZER_SOURCES, *TRAINING_SOURCES),
        recipe={"train": TRAIN, "grounding": GROUNDING},
        probe=_probe,
    )


def ensure_tiny_qwen2_vl(cache_dir: Path, trained: bool = True) -> Path:
    """Return the directory of the tiny Qwen2-VL checkpoint: cached or built now."""
    return ensure_checkpoint(cache_dir, "tiny-qwen2-vl", _build, trained, inputs=build_inputs)
