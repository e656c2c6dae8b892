"""SmolVLM (Idefics3-style): ``HuggingFaceTB/SmolVLM-256M-Instruct`` and its tiny twin."""

from __future__ import annotations

import dataclasses
import math

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..types import CaptionLength, GenerationRequest, ImageDetail, ImageTiling, Task
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

    can_chunk = True
    text_chunk_tokens = 256

    def encode_views(self, vision):
        """Chunked: the picture's views through the vision encoder one at a time (a 512-px view is the
        encoder's whole work unit: 1,024 patches at SmolVLM-256M size)."""
        pixels, mask = vision["pixel_values"], vision.get("pixel_attention_mask")
        pooled = []
        for view in range(pixels.shape[1]):
            one = {"pixel_values": pixels[:, view : view + 1]}
            if mask is not None:
                one["pixel_attention_mask"] = mask[:, view : view + 1]
            pooled.extend(self.model.get_image_features(**one, return_dict=True).pooler_output)
            yield
        return BaseModelOutputWithPooling(pooler_output=[torch.cat(pooled)])

    def embed_prompt(self, inputs, features):
        base = self.model.model
        ids = inputs["input_ids"]
        embeds = base.text_model.get_input_embeddings()(ids)
        image = torch.cat(list(features.pooler_output)).to(dtype=embeds.dtype, device=embeds.device)
        mask = base.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=image)
        return embeds.masked_scatter(mask, image)

    def image_tilings(self) -> dict[ImageDetail, ImageTiling]:
        """LOW: one view at the tile size; HIGH: the picture resized to the processor's longest edge and
        cut into tiles, plus a global view; AUTO: what the processor's ``do_image_splitting`` says."""
        images = self.processor.image_processor
        tile, longest = images.max_image_size["longest_edge"], images.size["longest_edge"]
        per_view = self.processor.image_seq_len
        grid = math.ceil(longest / tile)
        low = ImageTiling(ImageDetail.LOW, f"one {tile}-px view", 1, per_view)
        high = ImageTiling(
            ImageDetail.HIGH,
            f"up to {grid}x{grid} {tile}-px tiles of the picture at a {longest}-px longest edge, and a global view",
            grid * grid + 1,
            (grid * grid + 1) * per_view,
        )
        auto = dataclasses.replace(high if images.do_image_splitting else low, detail=ImageDetail.AUTO)
        return {ImageDetail.AUTO: auto, ImageDetail.LOW: low, ImageDetail.HIGH: high}

    def encode(self, prompts: list[str], images: list, detail: ImageDetail = ImageDetail.AUTO):
        splitting = {ImageDetail.LOW: {"do_image_splitting": False}, ImageDetail.HIGH: {"do_image_splitting": True}}
        return self.processor(
            text=prompts,
            images=[[image] for image in images],
            return_tensors="pt",
            padding=True,
            **splitting.get(detail, {}),
        )
