"""Prefix caching for the engine (llama.cpp's ``cache_prompt``): which cache row a newcomer runs in, and moving
row contents so that the engine's active rows stay ``0..n-1``.

Every cache row is a llama.cpp "slot" with a stable id (its label), which travels with the row's contents when
rows are swapped. A finished sequence that asked for ``cache_prompt`` leaves its tokens' keys and values in its
row (now free); a later ``cache_prompt`` request runs in the free row whose cached tokens share the longest
prefix with its prompt and prefills only the rest. Rows of sequences that did not ask for it are not kept
(keeping them costs a copy per finished request, which plain OpenAI traffic would pay for nothing)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..model import KVCache

# The share of a new prompt a free row must already hold to be picked for it (llama.cpp's default 0.5).
SIMILARITY = 0.5


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class RowTable:
    """Per cache row: its slot id, the tokens whose keys/values it holds while free (from its first real slot,
    ``pads[row]``; None: nothing reusable) and when it was last used (least recently used rows go first)."""

    size: int
    labels: list[int] = field(default_factory=list)
    tokens: list[list[int] | None] = field(default_factory=list)
    used_at: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.labels = list(range(self.size))
        self.tokens = [None] * self.size
        self.used_at = [0.0] * self.size

    def row_of(self, label: int) -> int:
        return self.labels.index(label)

    def pick(self, first_free: int, prompt: list[int], *, reuse: bool, slot: int | None,
             claimed: set[int]) -> tuple[int, int]:
        """The free row (index >= ``first_free``) a newcomer runs in and how many prompt tokens it has cached.

        ``slot`` (llama.cpp ``id_slot``) names the row; otherwise with ``reuse`` the row with the longest
        common prefix, and without a useful one (or without ``reuse``) an empty row, else the least
        recently used. Rows whose label is ``claimed`` (by an admitted ``id_slot`` request) are skipped."""
        if slot is not None and slot >= 0:
            row = self.row_of(slot)
            cached = self.tokens[row]
            return row, common_prefix(cached, prompt) if reuse and cached else 0
        rows = [r for r in range(first_free, self.size) if self.labels[r] not in claimed]
        if reuse:
            best, best_len = -1, 0
            for r in rows:
                cached = self.tokens[r]
                n = common_prefix(cached, prompt) if cached else 0
                if n > best_len:
                    best, best_len = r, n
            # llama.cpp's --slot-prompt-similarity: a row is chosen for its cache when it holds more than
            # half the prompt; otherwise another row's cache (maybe another editor's) is worth more.
            if best >= 0 and best_len > SIMILARITY * len(prompt):
                return best, best_len
        empty = [r for r in rows if self.tokens[r] is None]
        row = empty[0] if empty else min(rows, key=lambda r: self.used_at[r])
        cached = self.tokens[row]
        return row, common_prefix(cached, prompt) if reuse and cached else 0

    def touch(self, row: int) -> None:
        self.used_at[row] = time.monotonic()


def exchange_rows(cache: KVCache, lens: Tensor, pads: Tensor, table: RowTable, a: int, b: int, *,
                  keep_a: bool = True, keep_b: bool = True) -> None:
    """Swap the contents of cache rows ``a`` and ``b`` (keys, values, valid mask, lengths, slot ids, cached
    tokens). A side whose contents will be overwritten anyway (``keep_x=False``) is not copied."""
    if a == b:
        return
    used_a, used_b = int(lens[a]), int(lens[b])
    if keep_a and keep_b:
        saved = (cache.k[:, b, :, :used_b].clone(), cache.v[:, b, :, :used_b].clone())
        _copy(cache, a, b, used_a)
        cache.k[:, a, :, :used_b], cache.v[:, a, :, :used_b] = saved
    elif keep_a:
        _copy(cache, a, b, used_a)
    elif keep_b:  # the common case (a finished row without cache_prompt): one copy, as without prefix caching
        _copy(cache, b, a, used_b)
    index = torch.tensor([a, b], device=lens.device)
    swapped = torch.tensor([b, a], device=lens.device)
    cache.valid[index] = cache.valid[swapped]
    lens[index] = lens[swapped]
    pads[index] = pads[swapped]
    for values in (table.labels, table.tokens, table.used_at):
        values[a], values[b] = values[b], values[a]
    if not keep_a:
        table.tokens[b] = None
    if not keep_b:
        table.tokens[a] = None


def _copy(cache: KVCache, src: int, dst: int, used: int) -> None:
    if used:
        cache.k[:, dst, :, :used] = cache.k[:, src, :, :used]
        cache.v[:, dst, :, :used] = cache.v[:, src, :, :used]
