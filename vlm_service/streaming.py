"""From model output to clean text deltas.

Two small pieces, each usable alone:

* :class:`IncrementalDetokenizer` turns token ids into text one token at a time with tokenizers'
  ``DecodeStream``: constant work per token (no re-decoding of the whole answer), no word-boundary
  buffering (Japanese or Thai text streams per token), and never half of a multi-byte character.
  ``finish()`` releases whatever is still pending, so the concatenation of everything it returned
  equals ``tokenizer.decode(all_ids, skip_special_tokens=True)``.
* :class:`TextAssembler` turns raw text pieces into the deltas a client sees: it applies stop strings
  (holding back only text that could still become one), drops leading and trailing whitespace, and
  never yields an empty delta. Its concatenated output is exactly :func:`clean_answer` of the raw text,
  so a streamed answer equals the non-streamed one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

logger = logging.getLogger(__name__)


def _backend_tokenizer(tokenizer):
    """The ``tokenizers.Tokenizer`` behind a transformers tokenizer (or the object itself)."""
    return getattr(tokenizer, "_tokenizer", None) or getattr(tokenizer, "backend_tokenizer", None) or tokenizer


class IncrementalDetokenizer:
    """Decode generated token ids to text, one token at a time."""

    def __init__(self, tokenizer):
        from tokenizers.decoders import DecodeStream

        self._tokenizer = tokenizer
        self._backend = _backend_tokenizer(tokenizer)
        self._stream = DecodeStream(skip_special_tokens=True)
        self._ids: list[int] = []
        self._emitted: list[str] = []

    def step(self, token_id: int) -> str:
        """Add one token; return the text it completes ("" while a character is still partial)."""
        self._ids.append(token_id)
        piece = self._stream.step(self._backend, token_id)
        if piece:
            self._emitted.append(piece)
            return piece
        return ""

    def finish(self) -> str:
        """Return the text still pending (e.g. bytes that never formed a valid character)."""
        full = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        sent = "".join(self._emitted)
        if full.startswith(sent):
            rest = full[len(sent) :]
        else:  # pragma: no cover - DecodeStream's output is always a prefix for byte-level BPE
            logger.warning("incremental decode diverged from the full decode; keeping the streamed text")
            rest = ""
        if rest:
            self._emitted.append(rest)
        return rest


def clean_answer(raw: str, stop: Sequence[str] = ()) -> tuple[str, bool]:
    """The non-streamed answer: cut at the earliest stop string, strip surrounding whitespace.

    Returns the text and whether a stop string was found.
    """
    cut = _earliest_stop(raw, stop)
    if cut is not None:
        raw = raw[:cut]
    return raw.strip(), cut is not None


def _earliest_stop(text: str, stop: Sequence[str]) -> int | None:
    positions = [i for s in stop if s and (i := text.find(s)) >= 0]
    return min(positions) if positions else None


class TextAssembler:
    """Turn raw text pieces into clean, non-empty deltas whose concatenation is ``clean_answer(raw)``."""

    def __init__(self, stop: Sequence[str] = ()):
        self._stop = tuple(s for s in stop if s)
        self._pending = ""  # received, not yet sent
        self._started = False  # sent any non-whitespace yet
        self.stopped = False  # a stop string was found; nothing more will be sent

    def push(self, piece: str) -> str:
        """Add raw text; return the delta that is safe to send now (may be "")."""
        if self.stopped or not piece:
            return ""
        self._pending += piece
        cut = _earliest_stop(self._pending, self._stop)
        if cut is not None:
            self.stopped = True
            ready, self._pending = self._pending[:cut].rstrip(), ""
            return self._release(ready)
        # Hold back what could still become a stop string, and trailing whitespace (it may be the end).
        ready = self._pending[: len(self._pending) - self._held_stop_prefix()].rstrip()
        self._pending = self._pending[len(ready) :]
        return self._release(ready)

    def finish(self) -> str:
        """End of generation: release what was held back (minus trailing whitespace)."""
        if self.stopped:
            return ""
        ready, self._pending = self._pending.rstrip(), ""
        return self._release(ready)

    def _release(self, ready: str) -> str:
        if not self._started:
            ready = ready.lstrip()
            self._started = bool(ready)
        return ready

    def _held_stop_prefix(self) -> int:
        """Length of the longest tail of the pending text that could still grow into a stop string."""
        best = 0
        text = self._pending
        for s in self._stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best
