"""From model output to clean text deltas.

Two small pieces, each usable alone:

* :class:`IncrementalDetokenizer` turns token ids into text one token at a time: constant work per
  token (a small window is decoded, never the whole answer), no word-boundary buffering (Japanese
  or Thai text streams per token), and never half of a multi-byte character.
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
    """Decode generated token ids to text, one token at a time.

    Each token added decodes only a small window: the tokens released last (so tokenizers that drop
    a leading space keep it) and the tokens not yet fully released. Complete characters go out at once,
    even when the same token also starts a character that the next token completes.
    """

    _PARTIAL = "\ufffd"  # what an incomplete UTF-8 sequence decodes to

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._backend = _backend_tokenizer(tokenizer)
        self._ids: list[int] = []
        self._prefix_offset = 0  # window start: tokens kept for context
        self._read_offset = 0  # tokens before this are fully released
        self._released = 0  # characters released beyond the context text
        self._emitted: list[str] = []

    def _decode(self, ids: list[int]) -> str:
        return self._backend.decode(ids, skip_special_tokens=True)

    def add_token(self, token_id: int) -> str:
        """Add one token; return the text it completes ("" while a character is still partial)."""
        self._ids.append(token_id)
        context = self._decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._decode(self._ids[self._prefix_offset :])
        complete = not text.endswith(self._PARTIAL)
        ready = text if complete else text.rstrip(self._PARTIAL)
        start = len(context) + self._released
        if not text.startswith(context) or len(ready) < start:
            return ""  # wait: the window does not extend its context yet
        piece = ready[start:]
        if complete:
            self._prefix_offset, self._read_offset, self._released = self._read_offset, len(self._ids), 0
        else:
            self._released += len(piece)
        if piece:
            self._emitted.append(piece)
        return piece

    def finish(self) -> str:
        """Return the text still pending (e.g. bytes that never formed a valid character)."""
        full = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        sent = "".join(self._emitted)
        if full.startswith(sent):
            rest = full[len(sent) :]
        else:  # pragma: no cover - the windows' text is always a prefix for byte-level BPE
            logger.warning("incremental decode diverged from the full decode; keeping the streamed text")
            rest = ""
        if rest:
            self._emitted.append(rest)
        return rest


def clean_answer(raw: str, stop: Sequence[str] = (), role_prefixes: Sequence[str] = ()) -> tuple[str, bool]:
    """The non-streamed answer: cut at the earliest stop string, strip surrounding whitespace and a
    leading role word (one of ``role_prefixes``, e.g. ``"assistant\n"``), once.
    Returns the text and whether a stop string was found.
    """
    cut = _earliest_stop(raw, stop)
    if cut is not None:
        raw = raw[:cut]
    text = raw.strip()
    for prefix in role_prefixes:
        if text.startswith(prefix):
            text = text[len(prefix) :].strip()
            break
    return text, cut is not None


def _earliest_stop(text: str, stop: Sequence[str]) -> int | None:
    """Where to cut ``text``: the start of the stop string that completes first, as generation would
    meet it (on a tie, the longer one, which starts earlier)."""
    found = [(i + len(s), i) for s in stop if s and (i := text.find(s)) >= 0]
    return min(found)[1] if found else None


class TextAssembler:
    """Turn raw text pieces into clean, non-empty deltas whose concatenation is ``clean_answer(raw)``.

    Work per piece is proportional to the piece and the stop strings, not to the answer so far.
    """

    def __init__(self, stop: Sequence[str] = (), role_prefixes: Sequence[str] = ()):
        self._stop = tuple(s for s in stop if s)
        self._roles = tuple(role_prefixes)
        self._pending = ""  # received, neither sent nor dropped
        self._started = False  # sent any text yet
        self._role_checked = False  # the start was checked for a role word
        self.stopped = False  # a stop string was found; nothing more will be sent

    def push(self, piece: str) -> str:
        """Add raw text; return the delta that is safe to send now (may be "")."""
        if self.stopped or not piece:
            return ""
        self._pending += piece
        cut = _earliest_stop(self._pending, self._stop)
        if cut is not None:
            self.stopped = True
            self._pending = self._pending[:cut]
            return self._take(len(self._pending), final=True)
        # Hold back what could still grow into a stop string.
        return self._take(len(self._pending) - self._held_stop_prefix(), final=False)

    def finish(self) -> str:
        """End of generation: release what was held back (minus trailing whitespace)."""
        if self.stopped:
            return ""
        return self._take(len(self._pending), final=True)

    def _take(self, safe: int, final: bool) -> str:
        """Consume the clean text in ``pending[:safe]``; trailing whitespace waits (it may be the end)."""
        if not self._started:
            head = self._pending[:safe].lstrip()  # leading whitespace is dropped
            if self._roles and not self._role_checked:
                if not final and any(p.startswith(head) and len(head) < len(p) for p in self._roles):
                    return ""  # may still become a role word
                self._role_checked = True
                for prefix in self._roles:
                    if head.startswith(prefix):
                        head = head[len(prefix) :].lstrip()
                        break
            dropped = safe - len(head)
            self._pending, safe = self._pending[dropped:], safe - dropped
        ready = self._pending[:safe].rstrip()
        self._pending = "" if final else self._pending[len(ready) :]
        self._started = self._started or bool(ready)
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
