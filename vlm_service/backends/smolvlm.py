"""SmolVLM (Idefics3-style): ``HuggingFaceTB/SmolVLM-256M-Instruct`` and its tiny twin."""

from __future__ import annotations

from ..types import CaptionLength, GenerationRequest, Task
from .hf import TransformersBackend

#: The instruction sent for each caption length.
CAPTION_PROMPTS = {
    CaptionLength.SHORT: "Describe this image in a few words.",
    CaptionLength.NORMAL: "Describe this image.",
    CaptionLength.LONG: "Describe this image in detail.",
}


class SmolVLMBackend(TransformersBackend):
    family = "smolvlm"
    languages = ("en",)
    vision_inputs = ("pixel_values", "pixel_attention_mask")
    encoder_only_inputs = ("pixel_values", "pixel_attention_mask")

    def prompt(self, request: GenerationRequest) -> str:
        text = request.question if request.task is Task.QUERY else CAPTION_PROMPTS[request.length]
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def encode(self, prompts: list[str], images: list):
        return self.processor(text=prompts, images=[[image] for image in images], return_tensors="pt", padding=True)
