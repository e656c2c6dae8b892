"""Shared machinery for the transformers families (``AutoProcessor`` + ``AutoModelForImageTextToText``).

A family subclasses :class:`TransformersBackend` and writes only how a request becomes a prompt and
processor inputs, and which inputs feed its vision encoder. Everything else is shared: loading on the
chosen device and dtype, the prefill (with the image cache), and decoding, which runs through
:class:`~vlm_service.backends.decode_batch.DecodeBatch` whether a request is alone or batched with
others.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Generator
from dataclasses import replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vlm_service.backends.base import Backend, drained
from vlm_service.backends.decode_batch import DecodeBatch, Prefilled
from vlm_service.backends.runtime import ModelSpec, PrefillPolicy, Runtime, parameters, saved_dtype
from vlm_service.types import GenerationRequest, ImageDetail

logger = logging.getLogger(__name__)


class TransformersBackend(Backend):
    """A family served with ``AutoProcessor`` + ``AutoModelForImageTextToText``, decoded in a
    :class:`DecodeBatch`."""

    #: Extra keyword arguments for ``from_pretrained`` (processor and model).
    load_kwargs: dict[str, Any] = {}
    #: Processor outputs that ``model.get_image_features`` takes.
    vision_inputs: ClassVar[tuple[str, ...]] = ("pixel_values",)
    #: Processor outputs that only the vision encoder needs (left out once its output is given).
    encoder_only_inputs: ClassVar[tuple[str, ...]] = ("pixel_values",)

    processor: Any

    @classmethod
    def around(cls, model, processor) -> TransformersBackend:
        """A backend over an already-built model and processor (used to train the tiny checkpoints);
        with ``model=None``, one that only makes prompts and encodings (for their cache key)."""
        backend = cls(ModelSpec(name="local", source=""), Runtime(device="cpu"))
        backend.processor = processor
        if model is not None:
            backend.model, backend._device = model, model.device
            backend.end_token_ids = backend._end_token_ids()
        return backend

    def load(self) -> None:
        common = {"revision": self.spec.revision, **self.load_kwargs}
        device, dtype = self.runtime.resolve(saved_dtype(AutoConfig.from_pretrained(self.spec.source, **common)))
        self.processor = AutoProcessor.from_pretrained(self.spec.source, **common)
        self.model = AutoModelForImageTextToText.from_pretrained(self.spec.source, dtype=dtype, **common)
        self.model.to(device).eval()
        self._device = device
        self.prefill = self.runtime.prefill_policy(parameters(self.model), self.chunking)
        self.end_token_ids = self._end_token_ids()
        logger.info(
            "loaded %s (%s) on %s as %s%s",
            self.spec.name,
            type(self.model).__name__,
            device,
            dtype,
            ", chunked prefill" if self.prefill.chunked else "",
        )

    @abc.abstractmethod
    def prompt(self, request: GenerationRequest) -> str:
        """The chat-templated prompt text for a request (the image appears as its placeholder)."""

    @abc.abstractmethod
    def encode(
        self, prompts: list[str], images: list, detail: ImageDetail = ImageDetail.AUTO
    ) -> dict[str, torch.Tensor]:
        """Processor outputs (input_ids, pixel values, ...) for prompts with one image each (or, for a
        prompt with several, a list of them), each image processed at ``detail``."""

    def prepare(self, request: GenerationRequest) -> dict[str, torch.Tensor]:
        """Processor outputs for one request; the image's part comes from the image cache when it can
        (several pictures: each one's features do, in the prefill)."""
        if request.more_images:
            return self.encode([self.prompt(request)], [list(request.pictures)], request.detail)
        with self.images.preprocessing(self.processor, request.image_key):
            return self.encode([self.prompt(request)], [request.image], request.detail)

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def context_length(self) -> int:
        text_config = self.model.config.get_text_config()
        return int(getattr(text_config, "max_position_embeddings", 0) or 0)

    def _end_token_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return [eos] if isinstance(eos, int) else list(eos or [])

    def prefill_steps(self, request: GenerationRequest, inputs) -> Generator[None, None, tuple[torch.Tensor, Any, int]]:
        """Run the vision encoder (or take its cached output) and the prompt through the model, as a
        generator: each ``next()`` runs one chunk and yields, and the generator returns the last
        position's logits, the KV cache, and the position id of the next token. Unchunked (``self.prefill``) the whole prefill is one
        chunk. Chunked, a family that can cuts it into slices of the vision encoder's work
        (:meth:`encode_views`: SmolVLM's are groups of layers over one view) and spans of
        ``self.prefill.text_chunk_tokens`` prompt tokens (:meth:`embed_prompt`).
        Chunks depend on the request and the model only, never on timing or on other requests, so a
        request's answer is the same however its chunks interleave with other work.

        The picture's features are looked up in the image cache at the first chunk (another request
        on the same picture that joined just before may have computed them by then), except when
        ``inputs`` lack the pixels (``prepare`` found the features cached): those are taken now, as
        other requests' chunks may evict them before this one's first chunk runs."""
        inputs = dict(inputs.to(self._device))
        if request.more_images:
            return self._prefill_pictures(request, inputs)
        held = None
        if "pixel_values" not in inputs:
            held = self.images.get(request.image_key, "features")
            if held is None:  # evicted since prepare(): process the picture afresh
                inputs = dict(self.encode([self.prompt(request)], [request.image], request.detail).to(self._device))
        return self._prefill_chunks(request, inputs, held)

    def _prefill_chunks(self, request: GenerationRequest, inputs: dict, features: Any):
        if features is None:
            features = self.images.get(request.image_key, "features")
        if features is None:
            features = yield from self._vision_features(inputs)
            self.images.put(request.image_key, "features", features)
            self.images.drop_inputs(request.image_key, self.encoder_only_inputs)
        return (yield from self._prefill_text(inputs, features))

    def _prefill_pictures(self, request: GenerationRequest, inputs: dict):
        """The prefill of a Query about several pictures: each picture's features from the image cache,
        or from the vision encoder on that picture alone (then cached under its own key, so another
        request on any one of them finds it), then the prompt with all of them."""
        parts = []
        for picture, key in zip(request.pictures, request.picture_keys, strict=True):
            features = self.images.get(key, "features")
            if features is None:
                alone = replace(request, image=picture, more_images=(), more_digests=())
                encoded = self.encode([self.prompt(alone)], [picture], request.detail).to(self._device)
                features = yield from self._vision_features(encoded)
                self.images.put(key, "features", features)
            parts.extend(features.pooler_output)
        return (yield from self._prefill_text(inputs, _pooled(parts)))

    def _vision_features(self, inputs) -> Generator[None, None, Any]:
        """The vision encoder's output for the processor's ``inputs``: in chunks (:meth:`encode_views`)
        when the prefill is chunked or the family encodes its own way, else in one call."""
        vision = self._cast({key: inputs[key] for key in self.vision_inputs if key in inputs})
        if self.prefill.chunked or self.encodes_views:
            return (yield from self.encode_views(vision))
        return _pooled(self.model.get_image_features(**vision, return_dict=True).pooler_output)

    def _prefill_text(self, inputs: dict, features: Any):
        """The prompt through the language model with the pictures' ``features`` in place of their
        tokens: one piece, or spans of ``prefill.text_chunk_tokens`` when chunked."""
        for key in self.encoder_only_inputs:
            inputs.pop(key, None)
        length = inputs["input_ids"].shape[1]
        span = self.prefill.text_chunk_tokens if self.prefill.chunked else None
        if span is None or length <= span:
            output = self.model(**inputs, mm_encoder_outputs={"image": features}, use_cache=True, logits_to_keep=1)
            return output.logits, output.cache, self.next_positions([length])[0]
        embeds, mask, cache = self.embed_prompt(inputs, features), inputs["attention_mask"], None
        for start in range(0, length, span):
            end = min(length, start + span)
            output = self.model(
                inputs_embeds=embeds[:, start:end],
                attention_mask=mask[:, :end],
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            cache = output.cache
            if end < length:
                yield
        return output.logits, cache, self.next_positions([length])[0]

    #: How the family can cut a prefill into chunks (it implements encode_views and embed_prompt, and
    #: its text positions follow the cache's length), with the chunk sizes measured for its model; None:
    #: its prefill is one piece. Whether a model is chunked is :attr:`prefill`'s (the settings' and size's).
    chunking: ClassVar[PrefillPolicy | None] = None

    def encode_views(self, vision: dict[str, torch.Tensor]) -> Generator[None, None, Any]:
        """The vision encoder's output for ``vision`` (the processor's vision inputs), a chunk per ``next()``.
        Default: one chunk, the whole picture."""
        return _pooled(self.model.get_image_features(**vision, return_dict=True).pooler_output)
        yield  # a generator that does its work in one piece

    def _cast(self, vision: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Vision inputs with the pixels in the model's dtype."""
        pixels = vision["pixel_values"]
        return {**vision, "pixel_values": pixels.to(self.model.dtype)} if pixels.is_floating_point() else vision

    #: Whether the family computes vision features with :meth:`encode_views` even when its prefill is
    #: one piece (its encoder layers run outside PyTorch: SmolVLM with ``--openvino``).
    encodes_views: bool = False

    def embed_prompt(self, inputs: dict[str, torch.Tensor], features: Any) -> torch.Tensor:
        """The prompt's input embeddings with the image's features in place of its image tokens."""
        raise NotImplementedError(f"{type(self).__name__} prefills its prompt in one piece")

    def decode(self, input_ids, mask, positions, cache):
        """One decode step for every row of a batch: the model's forward pass over one new position per
        row (``mask`` the batch's attention mask, ``positions`` each row's position id); returns each
        row's logits and the cache one position longer."""
        output = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return output.logits[:, -1], output.cache

    def next_positions(self, lengths: list[int]) -> list[int]:
        """The position id of each row's next token after a prefill of rows of ``lengths`` tokens
        (left-padded together or alone): the row's length (multimodal RoPE shifts it)."""
        return lengths

    def text_positions(self, mask: torch.Tensor) -> torch.Tensor | None:
        """Position ids for left-padded prompts with attention ``mask`` (each row counts from its first
        real token, as alone); None: the model computes them from the mask itself."""
        return (mask.cumsum(-1) - 1).clamp(min=0)

    @property
    def prefills_together(self) -> bool:
        """Whether the prompts of requests that join at once go through the model together
        (:meth:`prefill_together`): when the prefill is one piece (not chunked)."""
        return not self.prefill.chunked

    def prefill_together(self, requests: list[GenerationRequest], inputs: list) -> Prefilled:
        """Several requests' prefills in one pass each of the vision encoder and the language model.

        Pictures whose features are cached are not encoded again, and a picture two of the requests
        share is encoded once. The others go through the vision encoder together, in groups of views
        of one shape (no padding between pictures); the prompts go through the language model
        left-padded to the longest, each row with its own positions, as ``generate`` batches them.
        On this CPU a row's numbers equal the same request's alone in float32 (tested); batched
        bfloat16 matrices may round differently (docs/guarantees.md)."""
        inputs = [dict(each.to(self._device)) for each in inputs]
        features: list[Any] = [None] * len(requests)
        pending: dict[str, list[int]] = {}  # the pictures to encode (by image key), the rows that use each
        for row, request in enumerate(requests):
            if request.image_key in pending:  # an earlier row's picture: encoded once for both
                pending[request.image_key].append(row)
                self.images.shared("features")
                continue
            features[row] = self.images.get(request.image_key, "features")
            if features[row] is not None:
                continue
            if "pixel_values" not in inputs[row]:  # evicted since prepare(): process the picture afresh
                encoded = self.encode([self.prompt(request)], [request.image], request.detail)
                inputs[row] = dict(encoded.to(self._device))
            pending.setdefault(request.image_key or f"row {row}", []).append(row)
        firsts = [rows[0] for rows in pending.values()]
        for rows, computed in zip(
            pending.values(), self._encode_together([inputs[row] for row in firsts]), strict=True
        ):
            for row in rows:
                features[row] = computed
            self.images.put(requests[rows[0]].image_key, "features", computed)
            self.images.drop_inputs(requests[rows[0]].image_key, self.encoder_only_inputs)
        lengths = [each["input_ids"].shape[1] for each in inputs]
        padded = max(lengths)
        batch: dict[str, torch.Tensor] = {}
        for key in inputs[0]:
            if key in self.encoder_only_inputs:
                continue
            values = [each[key] for each in inputs]
            if values[0].dim() == 2 and values[0].shape == (1, lengths[0]):  # per token: left-padded
                fill = (self.tokenizer.pad_token_id or 0) if key == "input_ids" else 0
                values = [F.pad(value, (padded - value.shape[1], 0), value=fill) for value in values]
            batch[key] = torch.cat(values)
        positions = self.text_positions(batch["attention_mask"])
        if positions is not None:
            batch["position_ids"] = positions
        pooled = [part for each in features for part in each.pooler_output]
        output = self.model(**batch, mm_encoder_outputs={"image": _pooled(pooled)}, use_cache=True, logits_to_keep=1)
        return Prefilled(output.logits[:, -1], output.cache, batch["attention_mask"], self.next_positions(lengths))

    def _encode_together(self, visions: list[dict[str, torch.Tensor]]) -> list[Any]:
        """The vision encoder's features for each picture's inputs, pictures whose views share a shape in
        one call (each picture's own entry of the pooled output)."""
        if self.encodes_views:  # its own encoder path: picture by picture
            return [drained(self.encode_views(self._cast(vision))) for vision in visions]
        out: list[Any] = [None] * len(visions)
        groups: dict[tuple, list[int]] = {}
        for index, each in enumerate(visions):
            shape = tuple(tuple(each[key].shape[1:]) for key in self.vision_inputs if key in each)
            groups.setdefault(shape, []).append(index)
        for indices in groups.values():
            joined = {
                key: torch.cat([visions[i][key] for i in indices])
                for key in self.vision_inputs
                if key in visions[indices[0]]
            }
            pooled = self.model.get_image_features(**self._cast(joined), return_dict=True).pooler_output
            for index, part in zip(indices, pooled, strict=True):
                out[index] = _pooled([part])
        return out

    def new_batch(self, max_rows: int) -> DecodeBatch:
        """A decode batch of up to ``max_rows`` rows (``generate`` runs one alone in a batch of one)."""
        return DecodeBatch(self, max_rows)


def _pooled(parts) -> BaseModelOutputWithPooling:
    """Vision features as the model takes them back (``mm_encoder_outputs``): the pooled output only, a
    list of one tensor per picture (the rest of the encoder's output is not kept)."""
    return BaseModelOutputWithPooling(pooler_output=list(parts))
