"""Exact incremental detokenisation with stop strings: generated ids in, text deltas out. Split out of
generation.py, which re-exports ``TextStream``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass
class TextStream:
    """Turns generated ids into text deltas whose concatenation is exactly the decoded continuation.

    SentencePiece drops the leading space of the first piece it decodes and byte-fallback pieces only make
    a character once all its bytes are there. So each step decodes a short window that starts a few tokens
    back (``context``: the end of the prompt, so a first ``▁return`` after ``x =`` yields `` return``) and
    hands out only what was added since the last step, holding back text that ends in an incomplete
    UTF-8 sequence (U+FFFD) or that could be the start of a stop string."""

    decode: Callable[[list[int]], str]
    context: list[int] = field(default_factory=list)
    stop: tuple[str, ...] = ()
    text: str = ""  # decoded continuation so far (trimmed at a stop string once one appears)
    stopped: bool = False
    _ids: list[int] = field(default_factory=list, repr=False)
    _prefix: int = 0
    _read: int = 0
    _emitted: int = 0

    def __post_init__(self) -> None:
        self._ids = list(self.context)
        self._read = len(self._ids)
        self.stop = tuple(s for s in self.stop if s)

    def push(self, token: int) -> str:
        """Add one generated token; returns the text that is now safe to show (maybe empty)."""
        if self.stopped:
            return ""
        self._ids.append(token)
        before = self.decode(self._ids[self._prefix:self._read])
        now = self.decode(self._ids[self._prefix:])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""  # an incomplete character (or nothing visible yet): wait for more tokens
        self._prefix, self._read = self._read, len(self._ids)
        return self._add(now[len(before):], final=False)

    def flush(self) -> str:
        """The rest of the text at the end of generation (incomplete bytes become U+FFFD, as in decode)."""
        if self.stopped:
            return ""
        before = self.decode(self._ids[self._prefix:self._read])
        now = self.decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return self._add(now[len(before):], final=True)

    def _add(self, delta: str, final: bool) -> str:
        old_len = len(self.text)
        self.text += delta
        safe = len(self.text)
        if self.stop:
            longest = max(len(s) for s in self.stop)
            search_from = max(0, old_len - longest + 1)
            hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = True
                out = self.text[self._emitted:]
                self._emitted = len(self.text)
                return out
            if not final:
                safe -= _held_back(self.text, self.stop, self._emitted)
        out = self.text[self._emitted:safe]
        self._emitted = max(self._emitted, safe)
        return out


def _held_back(text: str, stops: tuple[str, ...], emitted: int) -> int:
    """Length of the longest end of ``text`` (not yet emitted) that begins some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text) - emitted), best, -1):
            if s.startswith(text[len(text) - k:]):
                best = k
                break
    return best
