"""Token ids to text, one token at a time (see :class:`IncrementalDetokenizer`)."""

from __future__ import annotations

import logging

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
