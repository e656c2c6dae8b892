"""The transformers families' batch (continuous batching): rows join a running decode batch between
decode steps and leave it the step they finish.

A :class:`DecodeBatch` holds the rows being decoded together and one KV cache for all of them,
left-padded to a common length (an attention mask marks the padding). New requests are prefilled
by :meth:`DecodeBatch.prefill_step`, which the scheduler runs between decode steps, then their caches
are merged into the batch:

- a model whose prefill is one piece prefills every request that is waiting to join at once, in one
  pass each of the vision encoder and the language model (the backend's ``prefill_together``): eight
  requests that arrive together cost about what one batched ``generate`` call costs;
- a model that prefills in chunks (a large model on a CPU) runs the oldest joining request's next
  chunk, the vision encoder and the prompt exactly as they would run alone; batching them would not
  pay there (a CPU at that size is bound by compute, docs/performance.md).

Each :meth:`DecodeBatch.decode_step` runs one forward pass for every row, picks each
row's next token with that row's own options (greedy, or sampled with its own seeded generator; its own
repetition penalty), streams each row's text to its sink, and drops rows that are finished (end of
sequence, token budget, context length, cancelled RPC or stop string), so a finished row stops costing
compute.

It needs of a backend only what :class:`Prefiller` names (hf.py's ``TransformersBackend`` is one): it
never imports a family.

transformers' own continuous-batching manager was considered: it takes token ids only (no pixel
values), so it cannot serve a vision-language request; this module is the small part that it lacks.
"""

from __future__ import annotations

import collections
import secrets
from collections.abc import Generator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.generation import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from vlm_service.backends.base import Batch, Outcome, TextSink, drained
from vlm_service.backends.detokenizer import IncrementalDetokenizer
from vlm_service.types import FinishReason, GenerationRequest, SamplingParams


class Prefiller(Protocol):
    """What a :class:`DecodeBatch` needs of its backend."""

    #: The loaded model (its forward pass decodes every row at once).
    model: Any
    #: The token ids that end an answer.
    end_token_ids: list[int]

    @property
    def tokenizer(self) -> Any:
        """What turns the generated ids back into text."""

    @property
    def context_length(self) -> int:
        """The model's context length in tokens (0: unknown)."""

    def prepare(self, request: GenerationRequest) -> Mapping[str, torch.Tensor]:
        """The processor's outputs (``input_ids`` first among them) for one request."""

    def prefill_steps(
        self, request: GenerationRequest, inputs
    ) -> Generator[None, None, tuple[torch.Tensor, DynamicCache, int]]:
        """The prompt through the model, one chunk per ``next()``; returns the last logits, the KV cache
        and the next token's position id. Its chunks depend on the request only."""

    def decode(
        self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: DynamicCache
    ) -> tuple[torch.Tensor, DynamicCache]:
        """One decode step: each row's next-token logits (rows, vocabulary) and the cache one position
        longer."""

    @property
    def prefills_together(self) -> bool:
        """Whether requests that join at once are prefilled together (:meth:`prefill_together`) rather
        than chunk by chunk (:meth:`prefill_steps`)."""

    def prefill_together(self, requests: list[GenerationRequest], inputs: list) -> Prefilled:
        """Several requests' prompts (each with its ``prepare`` outputs) through the model at once."""


@dataclass
class Prefilled:
    """What a prefill of several rows at once leaves: per row, in order."""

    logits: torch.Tensor  # (rows, vocabulary): each row's last position
    cache: DynamicCache  # every row's keys and values, left-padded to the longest prompt
    mask: torch.Tensor  # (rows, padded length): 1 for real tokens, 0 for padding
    positions: list[int]  # each row's next position id


class SeededSampler:
    """Draws a row's next token from its warped distribution with the row's own ``torch.Generator``.

    The process-global RNG is never touched, so seeds are reproducible whatever else runs in the batch.
    """

    def __init__(self, params: SamplingParams, device: torch.device):
        self._warpers = [TemperatureLogitsWarper(params.temperature)]
        if params.top_k > 0:
            self._warpers.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            self._warpers.append(TopPLogitsWarper(params.top_p))
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        self._generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, scores: torch.FloatTensor) -> int:
        for warper in self._warpers:  # temperature, top-k and top-p look at the scores only
            scores = warper(None, scores)
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, num_samples=1, generator=self._generator)[0, 0])


@dataclass(eq=False)
class Row:
    """One request in the batch."""

    request: GenerationRequest
    sink: TextSink
    detokenizer: IncrementalDetokenizer
    prompt_ids: list[int]
    position: int  # the position id of the next token fed to the model
    sampler: SeededSampler | None
    penalty: RepetitionPenaltyLogitsProcessor | None
    next_token: int = -1
    tokens: list[int] = field(default_factory=list)
    outcome: Outcome | None = None

    @property
    def done(self) -> bool:
        return self.outcome is not None


@dataclass(eq=False)
class Joining:
    """A request whose prompt is being processed, one chunk per :meth:`DecodeBatch.prefill_step`."""

    row: Row
    steps: Generator[None, None, tuple[torch.Tensor, DynamicCache, int]] | None  # None: prefilled together
    chunks: int = 0  # chunks run so far


class DecodeBatch(Batch):
    """The rows decoded together on one model, and their shared KV cache."""

    def __init__(self, backend: Prefiller, max_rows: int = 1):
        self.backend = backend
        self.max_rows = max_rows
        self.model = backend.model
        self.device = backend.model.device
        self._end_ids = frozenset(backend.end_token_ids)
        self._context_length = backend.context_length or 1 << 62
        self.rows: list[Row] = []
        self._joining: collections.deque[Joining] = collections.deque()
        self._cache: DynamicCache | None = None  # every row's keys and values, batch-first, left-padded
        self._mask: torch.Tensor | None = None  # (rows, cache length): 1 for real tokens, 0 for padding

    def __len__(self) -> int:
        return len(self.rows)

    # --- joining ----------------------------------------------------------------------------------

    @property
    def joining(self) -> int:
        return len(self._joining)

    @property
    def _together(self) -> bool:
        return self.backend.prefills_together

    @property
    def next_prefill(self) -> list[TextSink]:
        if self._together:
            return [row.sink for row in self._next_group()]
        return [self._joining[0].row.sink] if self._joining else []

    def _next_group(self) -> list[Row]:
        """What the next prefill step runs when prefilling together: a Query about several pictures at
        the head of the queue alone (its prefill is its own), else every other joining request."""
        rows = [each.row for each in self._joining]
        if rows and rows[0].request.more_images:
            return rows[:1]
        return [row for row in rows if not row.request.more_images]

    def join(self, request: GenerationRequest, sink: TextSink) -> Outcome | None:
        """Queue ``request``'s prefill, which :meth:`prefill_step` runs (chunk by chunk, or together with
        the other requests joining); its first token is streamed when its prefill ends. Joining itself
        costs the model's thread nothing: the processor runs in the prefill (its first chunk, when
        chunked, which counts against the prefill budget like any chunk; its picture arrives reduced to
        the model's bound, so it is a small one).

        Returns None: a request cancelled meanwhile ends at its first :meth:`prefill_step`, before any
        of its prefill runs.
        """
        backend = self.backend
        params = request.params
        row = Row(
            request=request,
            sink=sink,
            detokenizer=IncrementalDetokenizer(backend.tokenizer),
            prompt_ids=[],  # known once the processor has run
            position=0,
            sampler=None if params.greedy else SeededSampler(params, self.device),
            penalty=(
                RepetitionPenaltyLogitsProcessor(params.repetition_penalty)
                if params.repetition_penalty != 1.0
                else None
            ),
        )
        self._joining.append(Joining(row, None if self._together else self._prefill_steps(row)))
        return None

    def _prefill_steps(self, row: Row):
        """The processor as a chunk of its own, then the backend's prefill."""
        inputs = self.backend.prepare(row.request)
        row.prompt_ids = inputs["input_ids"][0].tolist()
        yield
        return (yield from self.backend.prefill_steps(row.request, inputs))

    def prefill_step(self) -> list[tuple[TextSink, Outcome | None, bool]]:
        """Prefill work for the joining requests: all of them at once when the model prefills together,
        else the next chunk of the oldest one's prefill. A request whose RPC ended (its stop check, before
        any of its work) runs no more of it. A request whose prefill is done has its first token
        streamed and decodes with the others. Whatever happens, a request is out of the joining queue
        unless it has chunks left."""
        if self._together:
            return self._prefill_together()
        joining = self._joining.popleft()
        row = joining.row
        try:
            if row.sink.should_stop():  # its RPC ended (or its deadline passed) before this chunk
                joining.steps.close()
                self._finish(row, FinishReason.STOP)
                return [(row.sink, row.outcome, True)]
            with torch.inference_mode():
                next(joining.steps)
        except StopIteration as done:
            logits, cache, next_position = done.value
        else:
            joining.chunks += 1
            self._joining.appendleft(joining)
            return [(row.sink, None, False)]
        self._prefilled(row, logits, cache, next_position)
        return [(row.sink, row.outcome, True)]

    def _prefill_together(self) -> list[tuple[TextSink, Outcome | None, bool]]:
        """The joining requests' prefill in one pass (those whose RPC ended are left out); a Query about
        several pictures is prefilled in a step of its own, as alone (:meth:`_next_group`), so a failure
        of either never touches a request already merged into the batch."""
        group = self._next_group()
        taken = {id(row) for row in group}
        self._joining = collections.deque(each for each in self._joining if id(each.row) not in taken)
        live = []
        for row in group:
            if row.sink.should_stop():
                self._finish(row, FinishReason.STOP)
            elif row.request.more_images:
                self._prefill_alone(row)
            else:
                live.append(row)
        if live:
            with torch.inference_mode():
                inputs = [self.backend.prepare(row.request) for row in live]
                for row, each in zip(live, inputs, strict=True):
                    row.prompt_ids = each["input_ids"][0].tolist()
                prefilled = self.backend.prefill_together([row.request for row in live], inputs)
            for index, row in enumerate(live):
                row.position = prefilled.positions[index]
                self._emit(row, self._choose(row, prefilled.logits[index].float()))
            kept = [index for index, row in enumerate(live) if not row.done]
            if kept:
                cache, mask = prefilled.cache, prefilled.mask
                if len(kept) < len(live):
                    cache, mask = _rows_of(cache, mask, torch.tensor(kept, device=self.device))
                self._merge(cache, mask)
                self.rows.extend(live[index] for index in kept)
        return [(row.sink, row.outcome, True) for row in group]

    def _prefill_alone(self, row: Row) -> None:
        """One request's whole prefill, on its own (in a model that otherwise prefills together)."""
        with torch.inference_mode():
            self._prefilled(row, *drained(self._prefill_steps(row)))

    def _prefilled(self, row: Row, logits: torch.Tensor, cache: DynamicCache, next_position: int) -> None:
        """A request prefilled alone: its first token streamed, and it decodes with the others."""
        row.position = next_position
        self._emit(row, self._choose(row, logits[0, -1].float()))
        if not row.done:
            self._merge(cache, torch.ones((1, len(row.prompt_ids)), dtype=torch.long, device=self.device))
            self.rows.append(row)

    def _merge(self, cache: DynamicCache, new_mask: torch.Tensor) -> None:
        """Add the rows of ``cache`` (left-padded as ``new_mask`` says) to the batch's."""
        length = new_mask.shape[1]
        if self._cache is None:
            self._cache, self._mask = cache, new_mask
            return
        current = self._mask.shape[1]
        grow, pad = max(0, length - current), max(0, current - length)
        self._cache = _cache_of(
            (torch.cat([_left_pad(k, grow), _left_pad(nk, pad)]), torch.cat([_left_pad(v, grow), _left_pad(nv, pad)]))
            for (k, v), (nk, nv) in zip(_layers(self._cache), _layers(cache), strict=True)
        )
        self._mask = torch.cat([F.pad(self._mask, (grow, 0)), F.pad(new_mask, (pad, 0))])

    # --- decoding ---------------------------------------------------------------------------------

    def decode_step(self) -> list[tuple[TextSink, Outcome]]:
        """One decode step for every row; returns the rows that finished (and left the batch)."""
        if not self.rows:
            return []
        self._mask = F.pad(self._mask, (0, 1), value=1)
        input_ids = torch.tensor([[row.next_token] for row in self.rows], device=self.device)
        positions = torch.tensor([[row.position] for row in self.rows], device=self.device)
        with torch.inference_mode():
            logits, self._cache = self.backend.decode(input_ids, self._mask, positions, self._cache)
        logits = logits.float()
        if all(row.sampler is None and row.penalty is None for row in self.rows):
            chosen = logits.argmax(dim=-1).tolist()
        else:
            chosen = [self._choose(row, logits[i]) for i, row in enumerate(self.rows)]
        for row, token in zip(self.rows, chosen, strict=True):
            row.position += 1
            self._emit(row, token)
        finished = [row for row in self.rows if row.done]
        if finished:
            self._drop(finished)
        return [(row.sink, row.outcome) for row in finished]

    def _choose(self, row: Row, logits: torch.Tensor) -> int:
        if row.sampler is None and row.penalty is None:
            return int(logits.argmax())
        scores = logits[None]
        if row.penalty is not None:  # the only step that reads the row's ids so far
            scores = row.penalty(torch.tensor([row.prompt_ids + row.tokens], device=self.device), scores)
        if row.sampler is None:
            return int(scores.argmax())
        return row.sampler(scores)

    def _emit(self, row: Row, token: int) -> None:
        """Record and stream ``token`` for ``row``; finish the row if it should stop."""
        row.tokens.append(token)
        row.next_token = token
        piece = row.detokenizer.add_token(token)
        if piece:
            row.sink.add_text(piece)
        if token in self._end_ids:
            self._finish(row, FinishReason.STOP)
        elif len(row.tokens) >= row.request.params.max_new_tokens or row.position >= self._context_length:
            self._finish(row, FinishReason.LENGTH)
        elif row.sink.should_stop():
            self._finish(row, FinishReason.STOP)

    def _finish(self, row: Row, reason: FinishReason) -> None:
        piece = row.detokenizer.finish()
        if piece:
            row.sink.add_text(piece)
        row.outcome = Outcome(len(row.prompt_ids), len(row.tokens), reason)

    def _drop(self, finished: list[Row]) -> None:
        keep = [i for i, row in enumerate(self.rows) if not row.done]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self._cache, self._mask = None, None
            return
        self._cache, self._mask = _rows_of(self._cache, self._mask, torch.tensor(keep, device=self.device))

    def abort(self, joining: bool = True) -> list[TextSink]:
        """Drop every row (after a failed step), and with ``joining`` every joining request too;
        returns their sinks."""
        rows, self.rows = self.rows, []
        self._cache, self._mask = None, None
        dropped = []
        if joining:
            dropped, self._joining = list(self._joining), collections.deque()
            for each in dropped:
                if each.steps is not None:
                    each.steps.close()
        return [row.sink for row in rows] + [each.row.sink for each in dropped]


def _rows_of(cache: DynamicCache, mask: torch.Tensor, index: torch.Tensor) -> tuple[DynamicCache, torch.Tensor]:
    """The rows ``index`` of a left-padded cache and its mask, less the columns that are padding in
    every one of them."""
    mask = mask.index_select(0, index)
    start = int((mask.sum(dim=0) > 0).nonzero()[0, 0])
    cache = _cache_of(
        (k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:]) for k, v in _layers(cache)
    )
    return cache, mask[:, start:]


def _left_pad(tensor: torch.Tensor, amount: int) -> torch.Tensor:
    """Pad a (batch, heads, length, dim) cache tensor with ``amount`` positions on the left."""
    return F.pad(tensor, (0, 0, amount, 0)) if amount else tensor


def _layers(cache: DynamicCache):
    return [(layer.keys, layer.values) for layer in cache.layers]


def _cache_of(layers) -> DynamicCache:
    cache = DynamicCache()
    for index, (keys, values) in enumerate(layers):
        cache.update(keys, values, index)
    return cache
