"""One request's timeline: each phase stamped once, and everything measured about it derived from it.

The scheduler's thread stamps a job's phases as they happen: :meth:`Timeline.expired` (its deadline
passed in the queue) or :meth:`~Timeline.started` (it joined its model's batch), then
:meth:`~Timeline.prefilled` (its prompt is processed: a first token only when one was chosen),
:meth:`~Timeline.decoded` once per decode step it took part in, :meth:`~Timeline.first_text` (the
first text sent to its client) and :meth:`~Timeline.ended`. The Prometheus instruments and the trace's
spans are recorded here and only here, and the client's :class:`~vlm_service.types.Usage` is computed
from the same stamps (:meth:`~Timeline.usage`), so they cannot disagree:

- queue time: arrival to start; time to first token: arrival to first text; inter-token latency:
  the gap between a row's consecutive tokens (decode steps only: a prefill chunk or a stop check is
  not a token); tokens after end: decode steps a row ran after its RPC had ended;
- a request that ends before its first token (cancelled while queued or while its prompt was being
  processed) gets no first-token stamp, no decode span and no inter-token latency, and its prompt is
  not counted (:meth:`~Timeline.ended` with an outcome of no completion tokens counts no prompt unless
  its prefill completed).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from vlm_service.types import FinishReason, Usage

if TYPE_CHECKING:
    from vlm_service.backends.base import Outcome
    from vlm_service.observability.metrics import ModelMetrics
    from vlm_service.observability.tracing import GenerationTrace


class Timeline:
    __slots__ = (
        "arrival",
        "started_at",
        "first_token_at",
        "first_text_at",
        "last_token_at",
        "tokens",
        "tokens_after_end",
        "ended_at",
        "_metrics",
        "_trace",
    )

    def __init__(self, arrival: float, metrics: ModelMetrics | None = None, trace: GenerationTrace | None = None):
        self.arrival = arrival
        self.started_at: float | None = None  # joined its model's batch
        self.first_token_at: float | None = None  # prompt processed, first token chosen
        self.first_text_at: float | None = None  # first text sent to the client
        self.last_token_at: float | None = None
        self.tokens = 0  # tokens chosen so far (decode steps after the first, plus the first)
        self.tokens_after_end = 0  # decode steps run after the RPC ended
        self.ended_at: float | None = None
        self._metrics = metrics
        self._trace = trace

    def expired(self, at: float, error: BaseException) -> None:
        """The deadline passed at ``at`` while the request was queued: it never starts."""
        self.ended_at = at
        if self._metrics is not None:
            self._metrics.queue_expired.inc()
        if self._trace is not None:
            self._trace.expired(at, error)

    def started(self, at: float) -> None:
        """The request joined its model's batch at ``at``: the queue ends, the prefill begins."""
        self.started_at = at
        if self._metrics is not None:
            self._metrics.queue_time.observe(at - self.arrival)
        if self._trace is not None:
            self._trace.started(at)

    def prefilled(self, at: float, outcome: Outcome | None) -> None:
        """The request's prefill ended at ``at``: still running (``outcome`` None), or ended with
        ``outcome``. It has a first token unless it ended with none (stopped before its first token)."""
        if outcome is None or outcome.completion_tokens:
            self.first_token(at)

    def first_token(self, at: float) -> None:
        """The prompt is processed and the first token chosen at ``at``."""
        if self.first_token_at is not None:
            return
        self.first_token_at = self.last_token_at = at
        self.tokens = 1
        if self._trace is not None:
            self._trace.first_token(at)

    def decoded(self, at: float, after_end: bool) -> None:
        """One decode step of this request's row ended at ``at``: one more token (``after_end``: its RPC
        had already ended when the step began, so the token was work for nobody)."""
        if self.last_token_at is not None and self._metrics is not None:
            self._metrics.inter_token_latency.observe(at - self.last_token_at)
        self.last_token_at = at
        self.tokens += 1
        if after_end:
            self.tokens_after_end += 1
            if self._metrics is not None:
                self._metrics.tokens_after_end.inc()

    def first_text(self, at: float) -> None:
        """The first text went to the client at ``at``."""
        if self.first_text_at is not None:
            return
        self.first_text_at = at
        if self._metrics is not None:
            self._metrics.time_to_first_token.observe(at - self.arrival)

    def ended(
        self,
        at: float,
        outcome: Outcome | None = None,
        reason: FinishReason | None = None,
        error: BaseException | None = None,
    ) -> None:
        """The generation ended at ``at``: finished with ``reason``, failed with ``error``, or (neither)
        stopped because its RPC ended. A prompt counts only once its prefill completed."""
        self.ended_at = at
        prompt = outcome.prompt_tokens if outcome is not None and self.first_token_at is not None else 0
        completion = outcome.completion_tokens if outcome is not None else 0
        if self._metrics is not None and outcome is not None:
            self._metrics.tokens.inc(completion)
            self._metrics.prompt_tokens.inc(prompt)
            if reason is not None:
                self._metrics.finish_reasons[reason].inc()
        if self._trace is not None:
            self._trace.ended(at, reason, prompt, completion, error)

    def usage(self, outcome: Outcome, at: float | None = None) -> Usage:
        """What the client is told of its request, from the same stamps."""
        now = time.monotonic() if at is None else at
        return Usage(
            prompt_tokens=outcome.prompt_tokens,
            completion_tokens=outcome.completion_tokens,
            queue_time_ms=((self.started_at or now) - self.arrival) * 1000,
            time_to_first_token_ms=((self.first_text_at or now) - self.arrival) * 1000,
            total_time_ms=(now - self.arrival) * 1000,
        )
