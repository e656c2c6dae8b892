"""Qwen2-VL and Qwen2.5-VL: ``Qwen/Qwen2-VL-2B-Instruct`` and its tiny twin; answers in en/ja/zh/ko."""

from __future__ import annotations

import dataclasses

from vlm_service.backends.hf import TransformersBackend
from vlm_service.types import CaptionLength, GenerationRequest, ImageBound, ImageDetail, ImageTiling, Task

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


#: The most pixels a picture keeps at ImageDetail.LOW (a 512x512 view's worth).
LOW_DETAIL_PIXELS = 512 * 512


class Qwen2VLBackend(TransformersBackend):
    family = "qwen2-vl"
    languages = tuple(LANGUAGE_INSTRUCTIONS)
    # With special tokens skipped, a stray "<|im_start|>assistant\n" leaves its role word behind.
    role_prefixes = ("assistant\n",)
    vision_inputs = ("pixel_values", "image_grid_thw")
    encoder_only_inputs = ("pixel_values",)  # the grid sizes also place the image tokens (M-RoPE)

    def next_positions(self, lengths: list[int]) -> list[int]:
        # The prefill just computed the prompts' 3-D positions (from the attention mask, padding left
        # out); each row's text after it is shifted by its delta from the row's length.
        return [length + int(delta) for length, delta in zip(lengths, self.model.model.rope_deltas[:, 0], strict=True)]

    def text_positions(self, mask):
        return None  # M-RoPE: the model computes each row's 3-D positions from the mask

    def prompt(self, request: GenerationRequest) -> str:
        text = request.question if request.task is Task.QUERY else CAPTION_PROMPTS[request.length]
        instruction = LANGUAGE_INSTRUCTIONS[request.language]
        if instruction:
            text = f"{text}\n{instruction}"
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def _pixel_range(self) -> tuple[int, int, int]:
        """The processor's fewest and most pixels per picture, and the pixels one image token covers."""
        images = self.processor.image_processor
        fewest, most = images.size["shortest_edge"], images.size["longest_edge"]
        return fewest, most, (images.patch_size * images.merge_size) ** 2

    def image_bound(self, detail: ImageDetail) -> ImageBound:
        """The most pixels the processor keeps at ``detail``, and a quarter more: the processor then still
        makes its own last resize (to multiples of 28 px, rounding down as it does for any bigger
        picture), so a reduced picture gets the same grid, and image tokens, as the full one."""
        _, most, _ = self._pixel_range()
        if detail is ImageDetail.LOW:
            most = min(most, LOW_DETAIL_PIXELS)
        return ImageBound(pixels=most * 5 // 4)

    def image_tilings(self) -> dict[ImageDetail, ImageTiling]:
        """One view at any resolution: HIGH (and AUTO) keeps up to the processor's most pixels, LOW up to
        512x512 pixels' worth (fewer image tokens, in proportion)."""
        _, most, per_token = self._pixel_range()
        low_most = min(most, LOW_DETAIL_PIXELS)
        high = ImageTiling(ImageDetail.HIGH, f"one view of at most {most:,} pixels", 1, most // per_token)
        low = ImageTiling(ImageDetail.LOW, f"one view of at most {low_most:,} pixels", 1, low_most // per_token)
        return {
            ImageDetail.AUTO: dataclasses.replace(high, detail=ImageDetail.AUTO),
            ImageDetail.LOW: low,
            ImageDetail.HIGH: high,
        }

    def encode(self, prompts: list[str], images: list, detail: ImageDetail = ImageDetail.AUTO):
        options = {}
        if detail is ImageDetail.LOW:
            fewest, most, _ = self._pixel_range()
            options["size"] = {"shortest_edge": fewest, "longest_edge": min(most, LOW_DETAIL_PIXELS)}
        return self.processor(text=prompts, images=images, return_tensors="pt", padding=True, **options)
