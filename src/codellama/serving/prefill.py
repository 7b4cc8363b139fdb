"""How a newcomer gets into the engine's cache: the row it runs in (prefix_cache.py picks one and brings it to
index ``len(rows)``), its prompt's prefill (all of it, left-padded, or only what the row does not already hold)
and its first token. A mixin of ``Engine`` (scheduler.py), which owns the state it uses."""

from __future__ import annotations

import time

import torch
from torch import Tensor

from ..generation import forward_step
from ..model import KVCache
from .prefix_cache import exchange_rows
from .sequences import Sequence

# Prefill lengths are padded to a multiple of this with packed (oneDNN) weights; see PrefillMixin._prefill.
PREFILL_BUCKET = 32


class PrefillMixin:
    """Admission of one newcomer into the next free cache row (called on the engine thread)."""

    def _place(self, dec, seq: Sequence) -> int:
        """Bring the row the newcomer runs in to index ``len(self._rows)``; returns how many of its prompt
        tokens that row already holds (prefix caching), 0 for a fresh prefill."""
        row, table = len(self._rows), self._table
        P = len(seq.job.prompt)
        reuse = seq.cache_prompt and not seq.prompt_logprobs  # cached tokens would have no prompt logprobs
        if seq.slot is not None and seq.slot >= 0:
            self._claimed.discard(seq.slot)
        chosen, common = table.pick(row, seq.job.prompt, reuse=reuse, slot=seq.slot, claimed=self._claimed)
        # Keep the chosen row's cache only to reuse it; keep what sits at `row` when it is someone's cache.
        exchange_rows(self._cache, self._lens, self._pads, table, row, chosen,
                      keep_a=table.tokens[row] is not None, keep_b=common > 0)
        table.touch(row)
        table.tokens[row] = None  # active now: a failure half-way must not leave a cache that looks valid
        reused = min(common, P - 1)  # the last prompt token is recomputed: its logits choose the first token
        pad = int(self._pads[row])
        # The rest's padded prefill and the generated tokens both start after the prompt in the old row's layout.
        if reused > 0 and pad + P + max(seq.request.max_new_tokens - 1, self._tail_pad(dec, P - reused)) \
                > self.context:
            reused = 0  # the old row's left padding leaves no room for this prompt's budget: prefill afresh
        return reused

    def _tail_pad(self, dec, n: int) -> int:
        # Packed (oneDNN) weights compile a kernel per row count: a cached prefill's length is rounded up too,
        # with padding after the prompt (its slots are overwritten by the generated tokens before being read).
        return (-n) % PREFILL_BUCKET if dec.packed else 0

    def _prefill(self, dec, seq: Sequence) -> None:
        """Run the prompt through the model into the next free row and sample the first token."""
        seq.prefill_started = time.perf_counter()
        row = len(self._rows)
        reused = self._place(dec, seq)
        seq.tokens_cached = reused
        seq.id_slot = self._table.labels[row]
        if reused:
            return self._prefill_rest(dec, seq, reused)
        cache = self._cache
        P = len(seq.job.prompt)
        # oneDNN keeps a compiled kernel per input shape for packed weights, so prefilling every distinct prompt
        # length would grow memory by ~0.5 MB per length seen. Left-padding to a multiple of PREFILL_BUCKET
        # bounds the shapes; padding slots are masked out (as in a left-padded batch) and get no RoPE position.
        pad = (-P) % PREFILL_BUCKET if dec.packed else 0
        pad = max(0, min(pad, self.context - P - max(seq.request.max_new_tokens, 1) + 1))
        T = P + pad
        tokens = torch.zeros(1, T, dtype=torch.long, device=self._device)
        tokens[0, pad:] = torch.tensor(seq.job.prompt, device=self._device)
        positions = (torch.arange(T, device=self._device) - pad).clamp(min=0).unsqueeze(0)
        cache.valid[row] = True
        cache.valid[row, :pad] = False
        # A one-row view of the shared cache: without padding the prefill is exactly a solo run's.
        view = KVCache(k=cache.k[:, row:row + 1], v=cache.v[:, row:row + 1], valid=cache.valid[row:row + 1])
        logits = None
        if seq.prompt_logprobs:
            seq.request.prompt_token_logprobs = [0.0]
            seq.prompt_top = [[]]
        for start in range(0, T, self.prefill_chunk):
            end = min(start + self.prefill_chunk, T)
            logits = forward_step(self.model, dec, tokens[:, start:end], positions[:, start:end], view, self._rope,
                                  pad > 0, last_only=not seq.prompt_logprobs, decode=False)
            if seq.prompt_logprobs:
                # logits[:, t] scores the token in slot start + t + 1; slots before pad + 1 hold no prediction.
                lo = max(start, pad)
                targets = tokens[0, lo + 1:end + 1]
                if len(targets):
                    lps, tops = self._logprobs(logits[0, lo - start:lo - start + len(targets)], targets.tolist(),
                                               seq.top_logprobs or 0)
                    seq.request.prompt_token_logprobs.extend(lps)
                    seq.prompt_top.extend(tops)
                logits = logits[:, -1:]
        self._lens[row] = T
        self._pads[row] = pad
        self._admit(seq, logits[:, -1], P)

    def _prefill_rest(self, dec, seq: Sequence, reused: int) -> None:
        """Prefill only the prompt tokens after the ``reused`` ones that the row already holds."""
        row, cache, P = len(self._rows), self._cache, len(seq.job.prompt)
        pad = int(self._pads[row])
        rest = P - reused
        T = rest + self._tail_pad(dec, rest)
        tokens = torch.zeros(1, T, dtype=torch.long, device=self._device)
        tokens[0, :rest] = torch.tensor(seq.job.prompt[reused:], device=self._device)
        positions = (torch.arange(T, device=self._device) + reused).unsqueeze(0)
        view = KVCache(k=cache.k[:, row:row + 1], v=cache.v[:, row:row + 1], valid=cache.valid[row:row + 1])
        cache.valid[row, pad:] = True
        logits = None
        for start in range(0, T, self.prefill_chunk):
            end = min(start + self.prefill_chunk, T)
            view.length = pad + reused + start
            holds_last = start <= rest - 1 < end
            out = forward_step(self.model, dec, tokens[:, start:end], positions[:, start:end], view, self._rope,
                               pad > 0, last_only=not holds_last or end == rest, decode=False)
            if holds_last:
                logits = out[:, -1:] if end == rest else out[:, rest - 1 - start:rest - start]
        self._lens[row] = pad + P
        self._admit(seq, logits[:, -1], rest)

    def _admit(self, seq: Sequence, logits: Tensor, evaluated: int) -> None:
        """A prefilled newcomer joins the active rows and samples its first token from ``logits`` [1, V]."""
        self.stats.prefills += 1
        self.stats.prompt_tokens += evaluated
        self.stats.prompt_tokens_cached += len(seq.job.prompt) - evaluated
        seq._row = len(self._rows)
        self._rows.append(seq)
        if not seq.generate:
            seq.request.finish("length")
            return
        self._sample(seq_rows=[seq], logits=logits)
