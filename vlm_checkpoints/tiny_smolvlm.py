"""``tiny-smolvlm``: a tiny checkpoint of the real SmolVLM architecture, built offline.

It is a real ``SmolVLMForConditionalGeneration`` with a real ``SmolVLMProcessor`` (image processor with
image splitting, video processor, byte-level BPE tokenizer, the SmolVLM chat template), only small:
the service loads it through exactly the code path that loads ``HuggingFaceTB/SmolVLM-256M-Instruct``.
The build is deterministic (fixed corpus, fixed seed) and needs no network.
"""

from __future__ import annotations

import functools
from pathlib import Path

from .builder import TOKENIZER_SOURCES, TRAINING_SOURCES, BuildInputs, ensure_checkpoint, train_byte_level_bpe
from .corpus import tokenizer_corpus

# The chat template shipped with HuggingFaceTB/SmolVLM-256M-Instruct.
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# Vision tiles are TILE x TILE pixels; images are split into up to MAX_TILES_PER_SIDE^2 tiles plus a
# global view, as the real model does (it uses 512-pixel tiles).
TILE = 32
PATCH = 4
SCALE_FACTOR = 2
MAX_TILES_PER_SIDE = 2
IMAGE_SEQ_LEN = (TILE // PATCH) ** 2 // SCALE_FACTOR**2

#: Training on the synthetic shapes (see train.py); empty means random weights.
TRAIN = {"steps": 1000, "distinct_batches": 200, "lr": 3e-3}
# SmolVLM answers after "Assistant:" with a space, as the real model does.
ANSWER_PREFIX = " "

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<end_of_utterance>",
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
] + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]


def _processor():
    """The processor (tokenizer trained on the fixed corpus, image and video processors, chat template),
    the ids of the special tokens, and the vocabulary size."""
    from transformers import PreTrainedTokenizerFast, SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor

    backend = train_byte_level_bpe(tokenizer_corpus(), SPECIAL_TOKENS, vocab_size=1024)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    ids = {token: backend.token_to_id(token) for token in SPECIAL_TOKENS}

    image_processor = SmolVLMImageProcessor(
        size={"longest_edge": TILE * MAX_TILES_PER_SIDE},
        max_image_size={"longest_edge": TILE},
        do_image_splitting=True,
    )
    video_processor = SmolVLMVideoProcessor(size={"longest_edge": TILE}, max_image_size={"longest_edge": TILE})
    processor = SmolVLMProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        image_seq_len=IMAGE_SEQ_LEN,
        chat_template=CHAT_TEMPLATE,
    )
    return processor, ids, backend.get_vocab_size()


def _build(directory: Path, trained: bool = True) -> None:
    import torch
    from transformers import LlamaConfig, SmolVLMConfig, SmolVLMForConditionalGeneration
    from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig

    processor, ids, vocab_size = _processor()
    text_config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=ids["<|im_start|>"],
        eos_token_id=ids["<end_of_utterance>"],
        pad_token_id=ids["<|im_end|>"],
        tie_word_embeddings=False,
    )
    vision_config = SmolVLMVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=TILE,
        patch_size=PATCH,
    )
    config = SmolVLMConfig(
        text_config=text_config.to_dict(),
        vision_config=vision_config.to_dict(),
        scale_factor=SCALE_FACTOR,
        image_token_id=ids["<image>"],
        pad_token_id=ids["<|im_end|>"],
    )
    torch.manual_seed(0)
    model = SmolVLMForConditionalGeneration(config).eval()
    model.generation_config.bos_token_id = ids["<|im_start|>"]
    model.generation_config.eos_token_id = ids["<end_of_utterance>"]
    model.generation_config.pad_token_id = ids["<|im_end|>"]
    if trained and TRAIN:
        from vlm_service.backends.smolvlm import SmolVLMBackend

        from .train import train_transformers_vlm

        train_transformers_vlm(SmolVLMBackend.around(model, processor), answer_prefix=ANSWER_PREFIX, **TRAIN)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


def _probe() -> list:
    from vlm_service.backends.smolvlm import SmolVLMBackend

    from .train import probe_transformers_vlm

    processor, _, _ = _processor()
    return probe_transformers_vlm(SmolVLMBackend.around(None, processor), answer_prefix=ANSWER_PREFIX, **TRAIN)


@functools.cache
def build_inputs(trained: bool = True) -> BuildInputs:
    """What the build depends on (its cache key): this module and the tokenizer's code; trained, also
    the training code, the recipe, and the prompts and token ids of the probe requests."""
    if not (trained and TRAIN):
        return BuildInputs(sources=(__name__, *TOKENIZER_SOURCES))
    return BuildInputs(
        sources=(__name__, *TOKENIZER_SOURCES, *TRAINING_SOURCES),
        recipe={**TRAIN, "answer_prefix": ANSWER_PREFIX},
        probe=_probe,
    )


def ensure_tiny_smolvlm(cache_dir: Path, trained: bool = True) -> Path:
    """Return the directory of the tiny SmolVLM checkpoint: cached, shipped, or built now."""
    return ensure_checkpoint(cache_dir, "tiny-smolvlm", _build, trained, inputs=build_inputs)
