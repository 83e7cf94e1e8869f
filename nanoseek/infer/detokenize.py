"""Incremental detokenisation: the text of a growing token list, and the stop strings in it, at a
cost per token that does not grow with the length (benchmarks/detokenize.py measures both forms)."""

from __future__ import annotations

from collections.abc import Callable, Sequence


class Detokenizer:
    """decode(tokens) of a token list that only grows, kept exact a few tokens at a time, and the search
    for stop strings over the only part of the text where a new match can be.

    Re-decoding the whole list per token costs O(n) a token (quadratic in the length, measured in
    benchmarks/detokenize.py). Here each update decodes a window: the tokens since the text last ended
    on a whole character, after the tokens before that as context (a decoder such as SentencePiece's
    drops the leading space of the first token it sees, so the new text is the window's minus the
    context's). A window whose text ends in U+FFFD may stop in the middle of a multi-byte character,
    which a later token can complete: it stays pending, and is decoded again with the next tokens.
    The text before the pending part is final, kept in pieces and joined only when read, so a stop
    string that was not in the last text can only start in its last `longest stop - 1` characters or
    later. Callers stop at the first match.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        self.decode, self.stop = decode, list(stop)
        self._reach = max(map(len, self.stop), default=1) - 1
        self._final = [""]  # the text no later token changes, in pieces
        self._final_chars = 0
        self._tail = ""  # its last `_reach` characters
        self._pending = ""  # the text after it, which the next tokens may change
        self._context = 0  # token where the context starts
        self._final_tokens = 0  # tokens whose text is final (the window starts here)
        self._count = 0  # tokens decoded

    @property
    def text(self) -> str:
        if len(self._final) > 1:
            self._final = ["".join(self._final)]
        return self._final[0] + self._pending

    def update(self, tokens: list[int]) -> int | None:
        """Bring `text` up to decode(tokens); returns where the first stop string starts, if any."""
        if len(tokens) == self._count:
            return None
        context = self.decode(tokens[self._context:self._final_tokens])
        self._pending = self.decode(tokens[self._context:])[len(context):]
        self._count = len(tokens)
        searched, offset = self._tail + self._pending, self._final_chars - len(self._tail)
        hits = [offset + i for i in (searched.find(s) for s in self.stop) if i >= 0]
        if self._pending and not self._pending.endswith("\ufffd"):
            self._final.append(self._pending)
            self._final_chars += len(self._pending)
            self._tail = searched[max(len(searched) - self._reach, 0):]
            self._pending = ""
            self._context, self._final_tokens = self._final_tokens, len(tokens)
        return min(hits) if hits else None


class WholeTextDetokenizer:
    """The obviously correct reference for `Detokenizer`: decode everything, search everything."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        self.decode, self.stop, self.text = decode, list(stop), ""

    def update(self, tokens: list[int]) -> int | None:
        self.text = self.decode(tokens)
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        return min(hits) if hits else None
