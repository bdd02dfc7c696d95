"""One answer's text as its tokens arrive: new pieces, held back where they may not be final.

The whole answer is decoded again at each step and the new suffix given out, as `scanlab chat`
does (`decoder.chat.decode_stream`), held back while it ends in an incomplete UTF-8 character
(a byte-level token can split one) or in the beginning of a stop string, which is never shown:
the answer ends before it.
"""

from __future__ import annotations

from collections.abc import Sequence

from scanlab.decoder.formats.tokenizer import Tokenizer


class AnswerText:
    """Detokenizes one answer incrementally; `push` returns the text now safe to show."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.shown = ""
        self.stopped = False  # a stop string was found: the answer ends where it began

    def push(self, ids: Sequence[int], final: bool = False) -> str:
        """The text the new token ids add, or "" while held back; with `final`, all that is
        left (a stop string's beginning included: it did not come)."""
        if self.stopped:
            return ""
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._show(text[:cut])
        if not final:
            if text.endswith("\ufffd"):
                return ""
            text = text[: len(text) - self._stop_prefix(text)]
        return self._show(text)

    def _stop_prefix(self, text: str) -> int:
        """The length of the longest end of `text` that begins a stop string."""
        return max(
            (n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0
        )

    def _show(self, text: str) -> str:
        piece = text[len(self.shown) :] if text.startswith(self.shown) else ""
        if len(text) > len(self.shown):
            self.shown = text
        return piece
