"""Moondream2 through its published remote-code API (``trust_remote_code=True``).

It is loaded by :func:`~.remote_code.load_remote_model`, not ``from_pretrained``: the published
remote code (revision 2025-06-21) cannot go through transformers 5's meta-device loading (no
``post_init``; buffers made in ``__init__`` and never saved come back uninitialised). Its code fixes
the weights' dtype (bfloat16 for Moondream2); the loader then casts them to the dtype ``--dtype`` asks
(``auto``: float32 on a CPU, bfloat16 on CUDA, as for every family), so the log and ListModels report
the dtype the model computes in.

The model is driven only through ``encode_image``, ``caption`` and ``query`` with ``stream=True``: the
generator they return is pulled in the worker thread, one piece at a time, and closed as soon as the
request should stop (cancel, deadline, stop string). The published code yields text only when a word
ends, so the stop is also checked before each decode step's output layer (a forward pre-hook), which
ends the generation within one step. The model
keeps one KV cache per instance, so the engine's single worker per model is what keeps requests from
interleaving on it.

The image cache keeps ``encode_image``'s result (the API's ``EncodedImage``, made to be passed back to
``caption``/``query``) by content hash, so a Caption then Queries on one image encode it once.

The API does not report token counts: ``completion_tokens`` is the length of the answer re-tokenized
with the model's tokenizer where it exposes one (else the number of streamed pieces), and
``prompt_tokens`` is 0. Sampling draws from torch's global generator inside the remote code, so a
seeded request runs under ``torch.random.fork_rng`` (the global state is restored afterwards) and a
process-wide lock, which serialises sampled (non-greedy) requests across Moondream models.
"""

from __future__ import annotations

import logging
import secrets
import threading
from contextlib import nullcontext

import torch

from ..types import CaptionLength, FinishReason, GenerationRequest, Task
from .base import Backend, Outcome, TextSink
from .remote_code import cast_weights, load_remote_model, weights_dtype

logger = logging.getLogger(__name__)

LENGTHS = {CaptionLength.SHORT: "short", CaptionLength.NORMAL: "normal", CaptionLength.LONG: "long"}

_GLOBAL_RNG = threading.Lock()


class _Stopped(Exception):
    """Raised inside the remote code's decode step to end a generation that should stop."""


def _stop_check(out: TextSink):
    """A hook for the output layer: the remote code sends text only at word ends, so the request's stop
    (cancel, deadline, stop string) is checked at every decode step, not only when text comes out."""

    def check(module, args):
        if out.should_stop():
            raise _Stopped

    return check


class MoondreamBackend(Backend):
    family = "moondream"
    languages = ("en",)
    supported_options = frozenset({"max_new_tokens", "temperature", "top_p", "stop", "seed"})
    caption_budgets = {CaptionLength.SHORT: 32, CaptionLength.NORMAL: 128, CaptionLength.LONG: 512}

    def load(self) -> None:
        self._device, requested = self.runtime.resolve()
        self.model = load_remote_model(self.spec.source, self.spec.revision, self._device)
        fixed = weights_dtype(self.model)
        if cast_weights(self.model, requested):
            logger.info(
                "%s: its remote code makes %s weights; cast to %s (--dtype %s)",
                self.spec.name,
                str(fixed).removeprefix("torch."),
                str(requested).removeprefix("torch."),
                self.runtime.dtype,
            )
        self._dtype = weights_dtype(self.model)
        logger.info("loaded %s (%s) on %s as %s", self.spec.name, type(self.model).__name__, self._device, self.dtype)

    @property
    def dtype(self) -> str:
        return str(self._dtype).removeprefix("torch.")

    @property
    def tokenizer(self):
        return getattr(self.model, "tokenizer", None) or getattr(getattr(self.model, "model", None), "tokenizer", None)

    @property
    def context_length(self) -> int:
        inner = getattr(getattr(getattr(self.model, "model", None), "config", None), "text", None)
        return int(getattr(inner, "max_context", 0) or getattr(self.model.config, "max_context", 0) or 2048)

    def generate(self, request: GenerationRequest, out: TextSink) -> Outcome:
        params = request.params
        settings = {"temperature": params.temperature, "top_p": params.top_p, "max_tokens": params.max_new_tokens}
        sampling = not params.greedy
        rng = torch.random.fork_rng(devices=self._rng_devices()) if sampling else nullcontext()
        with _GLOBAL_RNG if sampling else nullcontext(), rng:
            if sampling:
                torch.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
            encoded = self.images.get(request.image_digest, "encoded")
            if encoded is None:
                encoded = self.model.encode_image(request.image)
                self.images.put(request.image_digest, "encoded", encoded)
            if out.should_stop():
                return Outcome(0, 0, FinishReason.STOP)
            if request.task is Task.CAPTION:
                result = self.model.caption(encoded, length=LENGTHS[request.length], stream=True, settings=settings)
                pieces = result["caption"]
            else:
                pieces = self.model.query(encoded, request.question, stream=True, settings=settings)["answer"]
            text = []
            step = self._decode_step_module()
            hook = step.register_forward_pre_hook(_stop_check(out)) if step is not None else None
            try:
                for piece in pieces:
                    if piece:
                        text.append(piece)
                        out.add_text(piece)
                    if out.should_stop():
                        break
            except _Stopped:
                pass
            finally:
                pieces.close()  # stops the remote generator at this step
                if hook is not None:
                    hook.remove()
        tokenizer = self.tokenizer
        answer = "".join(text)
        if tokenizer is not None and answer:
            encoded_answer = tokenizer.encode(answer)
            produced = len(getattr(encoded_answer, "ids", encoded_answer))
        else:
            produced = len(text)
        reason = FinishReason.LENGTH if produced >= params.max_new_tokens else FinishReason.STOP
        return Outcome(prompt_tokens=0, completion_tokens=min(produced, params.max_new_tokens), reason=reason)

    def _decode_step_module(self) -> torch.nn.Module | None:
        """The output layer, which the published code runs once per decode step (None if it has none)."""
        text = getattr(getattr(self.model, "model", None), "text", None)
        return text["lm_head"] if isinstance(text, torch.nn.ModuleDict) and "lm_head" in text else None

    def _rng_devices(self) -> list:
        return [self._device] if self._device.type == "cuda" else []
