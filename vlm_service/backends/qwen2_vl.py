"""Qwen2-VL and Qwen2.5-VL: ``Qwen/Qwen2-VL-2B-Instruct`` and its tiny twin; answers in en/ja/zh/ko."""

from __future__ import annotations

from ..types import CaptionLength, GenerationRequest, Task
from .hf import TransformersBackend

#: The instruction sent for each caption length.
CAPTION_PROMPTS = {
    CaptionLength.SHORT: "Describe this image in a few words.",
    CaptionLength.NORMAL: "Describe this image in one or two sentences.",
    CaptionLength.LONG: "Describe this image in detail.",
}

#: How the prompt asks for each response language (empty for English, the model's default).
LANGUAGE_INSTRUCTIONS = {
    "en": "",
    "ja": "日本語で答えてください。",
    "zh": "请用中文回答。",
    "ko": "한국어로 답해 주세요.",
}


class Qwen2VLBackend(TransformersBackend):
    family = "qwen2-vl"
    languages = tuple(LANGUAGE_INSTRUCTIONS)
    # With special tokens skipped, a stray "<|im_start|>assistant\n" leaves its role word behind.
    role_prefixes = ("assistant\n",)
    vision_inputs = ("pixel_values", "image_grid_thw")
    encoder_only_inputs = ("pixel_values",)  # the grid sizes also place the image tokens (M-RoPE)

    def position_offset(self) -> int:
        # The prefill just computed the prompt's 3-D positions; text after it is shifted by this delta.
        return int(self.model.model.rope_deltas[0, 0])

    def prompt(self, request: GenerationRequest) -> str:
        text = request.question if request.task is Task.QUERY else CAPTION_PROMPTS[request.length]
        instruction = LANGUAGE_INSTRUCTIONS[request.language]
        if instruction:
            text = f"{text}\n{instruction}"
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def encode(self, prompts: list[str], images: list):
        return self.processor(text=prompts, images=images, return_tensors="pt", padding=True)
