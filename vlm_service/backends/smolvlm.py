"""SmolVLM (Idefics3-style): ``HuggingFaceTB/SmolVLM-256M-Instruct`` and its tiny twin."""

from __future__ import annotations

import dataclasses
import logging
import math

import torch
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vlm_service.backends.hf import TransformersBackend
from vlm_service.backends.runtime import PrefillPolicy, parameters
from vlm_service.types import CaptionLength, GenerationRequest, ImageBound, ImageDetail, ImageTiling, Task

logger = logging.getLogger(__name__)

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

    #: The encoder's layers and the decode step run by OpenVINO (``--openvino``), or None: by PyTorch.
    _openvino = None
    _decoder = None

    def load(self) -> None:
        super().load()
        if self.runtime.uses_openvino(parameters(self.model), self._device):
            from vlm_service.backends.openvino import OpenVINODecoder, OpenVINOLayers

            base, threads = self.model.model, torch.get_num_threads()
            self._openvino = OpenVINOLayers(base.vision_model.encoder.layers, self.model.dtype, threads)
            self._decoder = OpenVINODecoder(base.text_model, self.model.lm_head, self.model.dtype, threads)
            logger.info("%s: vision encoder layers and decode steps run with OpenVINO", self.spec.name)

    def decode(self, input_ids, mask, positions, cache):
        if self._decoder is None:
            return super().decode(input_ids, mask, positions, cache)
        return self._decoder(input_ids, mask, positions, cache)

    @property
    def encodes_views(self) -> bool:
        return self._openvino is not None

    max_images = 8

    def prompt(self, request: GenerationRequest) -> str:
        text = request.question if request.task is Task.QUERY else CAPTION_PROMPTS[request.length]
        pictures = [{"type": "image"}] * len(request.pictures)
        messages = [{"role": "user", "content": [*pictures, {"type": "text", "text": text}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    #: A 512-px view (1,024 patches at SmolVLM-256M size) through SigLIP's 12 layers takes about 0.6 s
    #: on a 2-core CPU, so a chunk of 3 layers holds the streams already running for about 0.15 s; 128
    #: prompt tokens take about as long (docs/performance.md).
    chunking = PrefillPolicy(text_chunk_tokens=128, vision_chunk_layers=3)

    def encode_views(self, vision):
        """Chunked: the picture's views through the vision encoder one at a time, each
        ``prefill.vision_chunk_layers`` encoder layers per chunk."""
        pixels, mask = vision["pixel_values"], vision.get("pixel_attention_mask")
        pooled = []
        for view in range(pixels.shape[1]):
            one_mask = None if mask is None else mask[:, view : view + 1]
            pooled.append((yield from self._encode_view(pixels[:, view : view + 1], one_mask)))
            yield
        return BaseModelOutputWithPooling(pooler_output=[torch.cat(pooled)])

    def _encode_view(self, pixels: torch.Tensor, mask: torch.Tensor | None):
        """One view's image features, as ``model.get_image_features`` computes them for one real view
        (transformers 5's SmolVLM: patch mask, embeddings, encoder layers, post-layernorm, connector),
        with a chunk boundary after every ``prefill.vision_chunk_layers`` layers. The same operations in the
        same order, so the same features (test_chunked_prefill.py and test_real_size.py compare them)."""
        base = self.model.model
        vision = base.vision_model
        pixel_values = pixels.to(dtype=base.dtype).flatten(0, 1)  # (1, channels, height, width)
        if mask is None:
            mask = torch.ones(
                size=[pixel_values.shape[i] for i in (0, 2, 3)], dtype=torch.bool, device=pixel_values.device
            )
        else:
            mask = mask.flatten(0, 1)
        patch = base.config.vision_config.patch_size
        patch_mask = mask.unfold(1, patch, patch).unfold(2, patch, patch).sum(dim=(-1, -2)) > 0
        hidden = vision.embeddings(pixel_values=pixel_values, patch_attention_mask=patch_mask)
        attention = create_bidirectional_mask(
            config=vision.config, inputs_embeds=hidden, attention_mask=patch_mask.view(pixel_values.shape[0], -1)
        )
        layers = vision.encoder.layers
        step = self.prefill.vision_chunk_layers or len(layers)
        for start in range(0, len(layers), step):
            if start:
                yield
            if self._openvino is not None:
                hidden = self._openvino(start, min(start + step, len(layers)), hidden, _boolean(attention))
                continue
            for layer in layers[start : start + step]:
                hidden = layer(hidden, attention)
        features = base.connector(vision.post_layernorm(hidden))
        return features.reshape(-1, features.shape[-1])

    def embed_prompt(self, inputs, features):
        base = self.model.model
        ids = inputs["input_ids"]
        embeds = base.text_model.get_input_embeddings()(ids)
        image = torch.cat(list(features.pooler_output)).to(dtype=embeds.dtype, device=embeds.device)
        mask = base.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=image)
        return embeds.masked_scatter(mask, image)

    def image_bound(self, detail: ImageDetail) -> ImageBound:
        """The processor's longest edge, whatever the detail: it first scales every picture to it (and
        never above transformers' 4,096-px cap), then tiles or squares that."""
        return ImageBound(longest_edge=min(self.processor.image_processor.size["longest_edge"], 4096))

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
            images=[list(each) if isinstance(each, list | tuple) else [each] for each in images],
            return_tensors="pt",
            padding=True,
            **splitting.get(detail, {}),
        )


def _boolean(attention: torch.Tensor | None) -> torch.Tensor | None:
    """The encoder's attention mask as booleans (True: attend); None stays None (every patch real)."""
    if attention is None or attention.dtype == torch.bool:
        return attention
    return attention == 0  # an additive mask: 0 where attended, a large negative number elsewhere
