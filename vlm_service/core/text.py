"""From model output to clean text deltas.

:class:`TextAssembler` turns raw text pieces into the deltas a client sees: it applies stop strings
  (holding back only text that could still become one), drops leading and trailing whitespace, and
  never yields an empty delta. Its concatenated output is exactly :func:`clean_answer` of the raw text,
  so a streamed answer equals the non-streamed one.
"""

from __future__ import annotations

from collections.abc import Sequence


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
