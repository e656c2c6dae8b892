"""Shared machinery for families that run through transformers' ``generate``.

A family subclasses :class:`TransformersBackend` and writes only how a request becomes a prompt and
processor inputs. Everything else is shared: loading on the chosen device and dtype, per-token
streaming through :class:`~vlm_service.streaming.IncrementalDetokenizer`, stopping between decode steps,
and sampling with a per-request ``torch.Generator`` (the process-global RNG is never touched).
"""

from __future__ import annotations

import abc
import logging
import secrets
from typing import Any

import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
from transformers.generation.streamers import BaseStreamer

from ..streaming import IncrementalDetokenizer
from ..types import FinishReason, GenerationRequest, SamplingParams
from .base import Backend, ModelSpec, Outcome, Runtime, TextSink

logger = logging.getLogger(__name__)


class _StopWhen(StoppingCriteria):
    """Checked by ``generate`` after every decode step."""

    def __init__(self, out: TextSink):
        self._out = out

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self._out.should_stop(), dtype=torch.bool, device=input_ids.device)


class _SeededSampler(LogitsProcessor):
    """Samples the next token with this request's own generator, then forces it.

    ``generate`` runs greedy (``do_sample=False``); this last processor draws the token from the warped
    distribution and masks every other logit, so the greedy pick is the sampled token. The draw uses a
    ``torch.Generator`` owned by the request, which makes seeds reproducible and concurrency-safe.
    """

    def __init__(self, params: SamplingParams, device: torch.device):
        self._warpers = [TemperatureLogitsWarper(params.temperature)]
        if params.top_k > 0:
            self._warpers.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            self._warpers.append(TopPLogitsWarper(params.top_p))
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        self._generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for warper in self._warpers:
            scores = warper(input_ids, scores)
        probs = torch.softmax(scores.float(), dim=-1)
        chosen = torch.multinomial(probs, num_samples=1, generator=self._generator)
        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter_(1, chosen, 0.0)


class _TokenStreamer(BaseStreamer):
    """Receives each new token from ``generate`` (in the worker thread) and forwards its text."""

    def __init__(self, detokenizer: IncrementalDetokenizer, out: TextSink):
        self._detokenizer = detokenizer
        self._out = out
        self._prompt_seen = False
        self.tokens: list[int] = []

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # the first call carries the prompt
            self._prompt_seen = True
            return
        for token_id in value.reshape(-1).tolist():
            self.tokens.append(token_id)
            piece = self._detokenizer.step(token_id)
            if piece:
                self._out.add_text(piece)

    def end(self) -> None:
        piece = self._detokenizer.finish()
        if piece:
            self._out.add_text(piece)


class TransformersBackend(Backend):
    """A family served with ``AutoProcessor`` + ``AutoModelForImageTextToText`` + ``generate``."""

    #: Extra keyword arguments for ``from_pretrained`` (processor and model).
    load_kwargs: dict[str, Any] = {}

    processor: Any

    @classmethod
    def around(cls, model, processor) -> TransformersBackend:
        """A backend over an already-built model and processor (used to train the tiny checkpoints)."""
        backend = cls(ModelSpec(name="local", source=""), Runtime(device="cpu"))
        backend.model, backend.processor, backend._device = model, processor, model.device
        return backend

    def load(self) -> None:
        device, dtype = self.runtime.resolve()
        common = {"revision": self.spec.revision, **self.load_kwargs}
        self.processor = AutoProcessor.from_pretrained(self.spec.source, **common)
        self.model = AutoModelForImageTextToText.from_pretrained(self.spec.source, dtype=dtype, **common)
        self.model.to(device).eval()
        self._device = device
        self._eos_ids = self._end_token_ids()
        logger.info("loaded %s (%s) on %s as %s", self.spec.name, type(self.model).__name__, device, dtype)

    @abc.abstractmethod
    def prompt(self, request: GenerationRequest) -> str:
        """The chat-templated prompt text for a request (the image appears as its placeholder)."""

    @abc.abstractmethod
    def encode(self, prompts: list[str], images: list) -> dict[str, torch.Tensor]:
        """Processor outputs (input_ids, pixel values, ...) for prompts with one image each."""

    def prepare(self, request: GenerationRequest) -> dict[str, torch.Tensor]:
        """Processor outputs for one request."""
        return self.encode([self.prompt(request)], [request.image])

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

    def generate(self, request: GenerationRequest, out: TextSink) -> Outcome:
        inputs = self.prepare(request).to(self._device)
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        prompt_tokens = int(inputs["input_ids"].shape[1])
        params = request.params
        streamer = _TokenStreamer(IncrementalDetokenizer(self.tokenizer), out)
        if out.should_stop():  # cancelled while preprocessing
            return Outcome(prompt_tokens, 0, FinishReason.STOP)
        processors = LogitsProcessorList()
        if not params.greedy:
            processors.append(_SeededSampler(params, self._device))
        pad = self.model.generation_config.pad_token_id
        with torch.inference_mode():
            self.model.generate(
                **inputs,
                max_new_tokens=params.max_new_tokens,
                do_sample=False,
                num_beams=1,
                temperature=None,
                top_p=None,
                top_k=None,
                repetition_penalty=params.repetition_penalty,
                eos_token_id=self._eos_ids,
                pad_token_id=pad if pad is not None else self._eos_ids[0],
                logits_processor=processors,
                stopping_criteria=StoppingCriteriaList([_StopWhen(out)]),
                streamer=streamer,
            )
        tokens = streamer.tokens
        reason = FinishReason.STOP if tokens and tokens[-1] in self._eos_ids else FinishReason.LENGTH
        return Outcome(prompt_tokens, len(tokens), reason)
