"""Moondream2 through its published remote-code API (``trust_remote_code=True``).

It is loaded by :func:`~.remote_code.load_remote_model`, not ``from_pretrained``: the published
remote code (revision 2025-06-21) cannot go through transformers 5's meta-device loading (no
``post_init``; buffers made in ``__init__`` and never saved come back uninitialised). Its code fixes
the weights' dtype (bfloat16 for Moondream2); the loader then casts them to the dtype ``--dtype`` asks
(``auto``: bfloat16 on CUDA, and on a CPU with bfloat16 instructions when the code fixes bfloat16;
float32 on other CPUs; as for every family, see ``Runtime.resolve``), so the log and ListModels
report the dtype the model computes in.

The model is driven only through ``encode_image``, ``caption`` and ``query`` with ``stream=True``: its
batch (:class:`_AnswerStream`) holds one request at a time, and each of its decode steps pulls one
piece from the generator they return, in the model's scheduler thread; the generator is closed as
soon as the request should stop (cancel, deadline, stop string). The published code yields text only
when a word ends, so the stop is also checked before each decode step's output layer (a forward
pre-hook), which ends the generation within one step. The model keeps one KV cache per instance, so
the batch's one row is what keeps requests from interleaving on it.

The image cache keeps ``encode_image``'s result (the API's ``EncodedImage``, made to be passed back to
``caption``/``query``) by content hash, so a Caption then Queries on one image encode it once.

The API does not report token counts: ``completion_tokens`` is the length of the answer re-tokenized
with the model's tokenizer where it exposes one (else the number of streamed pieces), and
``prompt_tokens`` is 0. Sampling draws from torch's global generator inside the remote code, so a
seeded request runs under ``torch.random.fork_rng`` (the global state is restored afterwards) and a
process-wide lock, which serialises sampled (non-greedy) requests across Moondream models.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
from collections.abc import Generator

import torch

from vlm_service.backends.base import Backend, Batch, Outcome, TextSink
from vlm_service.backends.remote_code import cast_weights, load_remote_model, weights_dtype
from vlm_service.types import CaptionLength, FinishReason, GenerationRequest, ImageBound, ImageDetail, Region, Task

logger = logging.getLogger(__name__)

LENGTHS = {CaptionLength.SHORT: "short", CaptionLength.NORMAL: "normal", CaptionLength.LONG: "long"}

_GLOBAL_RNG = threading.Lock()
#: Seconds between the signs of life of a request waiting for ``_GLOBAL_RNG``.
_RNG_WAIT_POLL = 0.25


def _wait_for_global_rng(out: TextSink) -> bool:
    """Take ``_GLOBAL_RNG``, which a sampled generation on another Moondream model may hold for its
    whole answer. The wait is a sign of life for the watchdog (``out.waiting()``), not a stuck model;
    False (the lock not taken) if the request's RPC ended meanwhile."""
    while not _GLOBAL_RNG.acquire(timeout=_RNG_WAIT_POLL):
        if out.waiting():
            return False
    return True


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
    grounding = frozenset({Task.DETECT, Task.POINT})
    caption_budgets = {CaptionLength.SHORT: 32, CaptionLength.NORMAL: 128, CaptionLength.LONG: 512}

    def load(self) -> None:
        device, _ = self.runtime.resolve()
        self.model = load_remote_model(self.spec.source, self.spec.revision, device)
        fixed = weights_dtype(self.model)
        self._device, requested = self.runtime.resolve(saved=fixed)  # the code fixes its weights' dtype
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

    def image_bound(self, detail: ImageDetail) -> ImageBound | None:
        """At most ``max_crops`` crops of ``crop_size`` pixels along an edge (the remote code's vision
        config): its tiling never uses a longer edge. None if the code does not say."""
        vision = getattr(getattr(getattr(self.model, "model", None), "config", None), "vision", None)
        crop, crops = getattr(vision, "crop_size", 0), getattr(vision, "max_crops", 0)
        return ImageBound(longest_edge=crop * crops) if crop and crops else None

    def new_batch(self, max_rows: int) -> Batch:
        """One row at a time (the model keeps one KV cache), whatever ``max_rows`` allows."""
        return _AnswerStream(self)

    def _decode_step_module(self) -> torch.nn.Module | None:
        """The output layer, which the published code runs once per decode step (None if it has none)."""
        text = getattr(getattr(self.model, "model", None), "text", None)
        return text["lm_head"] if isinstance(text, torch.nn.ModuleDict) and "lm_head" in text else None

    def _region_decoders(self) -> tuple[torch.nn.Module, torch.nn.Module] | None:
        """The last layers of the region head's coordinate and size decoders, which the published
        ``detect``/``point`` run once per coordinate and once per size (None if the code has none)."""
        region = getattr(getattr(self.model, "model", None), "region", None)
        try:
            return region["coord_decoder"]["fc2"], region["size_decoder"]["fc2"]
        except (KeyError, TypeError):
            return None

    def _rng_devices(self) -> list:
        return [self._device] if self._device.type == "cuda" else []


class _AnswerStream(Batch):
    """Moondream's batch: one row, whose decode step pulls one piece from the remote code's generator.

    What the generation holds while it runs (the process-wide lock and forked global generator of a
    sampled request, the stop hook, the generator) is entered when the request joins and let go when
    it ends or is dropped, in the scheduler's thread.
    """

    def __init__(self, backend: MoondreamBackend):
        self._backend = backend
        self._request: GenerationRequest | None = None
        self._out: TextSink | None = None
        self._pieces: Generator[str, None, None] | None = None
        self._text: list[str] = []
        self._held = contextlib.ExitStack()

    def __len__(self) -> int:
        return 0 if self._request is None else 1

    def join(self, request: GenerationRequest, out: TextSink) -> Outcome | None:
        backend, params = self._backend, request.params
        self._request, self._out, self._text = request, out, []
        try:
            if not params.greedy:
                if not _wait_for_global_rng(out):  # its RPC ended while another model sampled
                    self._release()
                    return Outcome(0, 0, FinishReason.STOP)
                self._held.callback(_GLOBAL_RNG.release)
                self._held.enter_context(torch.random.fork_rng(devices=backend._rng_devices()))
                torch.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
            encoded = backend.images.get(request.image_key, "encoded")
            if encoded is None:
                encoded = backend.model.encode_image(request.image)
                backend.images.put(request.image_key, "encoded", encoded)
            if out.should_stop():
                self._release()
                return Outcome(0, 0, FinishReason.STOP)
            if request.task.grounding:
                return self._ground(request, encoded, out)
            settings = {"temperature": params.temperature, "top_p": params.top_p, "max_tokens": params.max_new_tokens}
            if request.task is Task.CAPTION:
                result = backend.model.caption(encoded, length=LENGTHS[request.length], stream=True, settings=settings)
                pieces = result["caption"]
            else:
                pieces = backend.model.query(encoded, request.question, stream=True, settings=settings)["answer"]
            step = backend._decode_step_module()
            if step is not None:
                self._held.callback(step.register_forward_pre_hook(_stop_check(out)).remove)
            self._held.callback(pieces.close)  # stops the remote generator at this step
            self._pieces = pieces
            return self._pull()
        except BaseException:
            self.abort()
            raise

    def _ground(self, request: GenerationRequest, encoded, out: TextSink) -> Outcome:
        """A Detect or Point through the published ``detect``/``point``, whole, inside the join.

        The published code returns its objects in one list when it is done; each is sent as soon as
        it is decoded by reading the region head's outputs as the published loop does (forward hooks:
        argmax bin / bins for a coordinate, the log-scale size bins for a box), and the list returned
        is checked against what was sent. The stop is checked at every decode step (the output
        layer's pre-hook), so a cancelled request stops within a step."""
        backend = self._backend
        model, detect = backend.model, request.task is Task.DETECT
        steps = 0
        coordinates: list[float] = []

        def step(module, args):
            nonlocal steps
            steps += 1
            if out.should_stop():
                raise _Stopped

        def coordinate(module, args, logits):
            coordinates.append(_bin_fraction(logits))
            if not detect and len(coordinates) == 2:
                out.add_region(_point(*coordinates))
                sent.append(coordinates[:])
                coordinates.clear()

        def size(module, args, logits):
            width, height = _size(logits)
            x, y = coordinates
            out.add_region(_box(x, y, width, height))
            sent.append([x, y, width, height])
            coordinates.clear()

        sent: list[list[float]] = []
        head, decoders = backend._decode_step_module(), backend._region_decoders()
        if head is not None:
            self._held.callback(head.register_forward_pre_hook(step).remove)
        if decoders is not None:
            self._held.callback(decoders[0].register_forward_hook(coordinate).remove)
            self._held.callback(decoders[1].register_forward_hook(size).remove)
        settings = {"max_objects": request.max_objects}
        try:
            if detect:
                found = [
                    [
                        (o["x_min"] + o["x_max"]) / 2,
                        (o["y_min"] + o["y_max"]) / 2,
                        o["x_max"] - o["x_min"],
                        o["y_max"] - o["y_min"],
                    ]
                    for o in model.detect(encoded, request.target, settings=settings)["objects"]
                ]
            else:
                found = [[p["x"], p["y"]] for p in model.point(encoded, request.target, settings=settings)["points"]]
        except _Stopped:
            found = None
        finally:
            self._release()
        if found is not None:
            if decoders is None:  # no hooks to read: the objects go out as the call returns them
                for values in found:
                    out.add_region(_box(*values) if detect else _point(*values))
            elif not _same(found, sent):
                raise RuntimeError(f"moondream's {request.task.value} returned {found}, its region head decoded {sent}")
        count = len(sent) if decoders is not None else len(found or ())
        reason = FinishReason.MAX_OBJECTS if count >= request.max_objects else FinishReason.STOP
        return Outcome(prompt_tokens=0, completion_tokens=max(steps - 1, 0), reason=reason)

    def decode_step(self) -> list[tuple[TextSink, Outcome]]:
        out = self._out
        outcome = self._pull()
        return [] if outcome is None else [(out, outcome)]

    def _pull(self) -> Outcome | None:
        """The next piece of the answer; the outcome once it has ended."""
        out = self._out
        try:
            piece = next(self._pieces)
        except (StopIteration, _Stopped):
            return self._end()
        if piece:
            self._text.append(piece)
            out.add_text(piece)
        return self._end() if out.should_stop() else None

    def _end(self) -> Outcome:
        request, answer = self._request, "".join(self._text)
        self._release()
        max_new_tokens = request.params.max_new_tokens
        tokenizer = self._backend.tokenizer
        if tokenizer is not None and answer:
            encoded_answer = tokenizer.encode(answer)
            produced = len(getattr(encoded_answer, "ids", encoded_answer))
        else:
            produced = len(self._text)
        reason = FinishReason.LENGTH if produced >= max_new_tokens else FinishReason.STOP
        return Outcome(prompt_tokens=0, completion_tokens=min(produced, max_new_tokens), reason=reason)

    def _release(self) -> None:
        self._request, self._out, self._pieces = None, None, None
        self._held.close()

    def abort(self, joining: bool = True) -> list[TextSink]:
        out = self._out
        with contextlib.suppress(Exception):
            self._release()
        return [] if out is None else [out]


def _bin_fraction(logits: torch.Tensor) -> float:
    """A coordinate as the published code decodes it: the most likely bin over the number of bins."""
    return (logits.argmax(dim=-1) / logits.shape[-1]).item()


def _size(logits: torch.Tensor) -> tuple[float, float]:
    """Width and height as the published code decodes them: log-scale bins, 2 ** (bin / (bins - 1) * 10 - 10)."""
    bins = logits.reshape(2, -1)
    width, height = (2.0 ** (index.float() / (bins.shape[-1] - 1) * 10.0 - 10.0) for index in bins.argmax(dim=-1))
    return width.item(), height.item()


def _clip(value: float) -> float:
    return min(max(value, 0.0), 1.0)


def _box(x: float, y: float, width: float, height: float) -> Region:
    """The published code's box (centre +- half the size), clipped to the picture: it may reach past
    an edge."""
    return Region(box=(_clip(x - width / 2), _clip(y - height / 2), _clip(x + width / 2), _clip(y + height / 2)))


def _point(x: float, y: float) -> Region:
    return Region(point=(_clip(x), _clip(y)))


def _same(returned: list[list[float]], decoded: list[list[float]]) -> bool:
    return len(returned) == len(decoded) and all(
        abs(a - b) <= 1e-4 for r, d in zip(returned, decoded, strict=True) for a, b in zip(r, d, strict=True)
    )
