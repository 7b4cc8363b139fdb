"""``codellama serve --draft``: the server with speculative decoding (speculative.py).

Speculation verifies a different number of tokens per row and round, and the KV cache keeps one length per batch,
so this engine runs one request at a time through ``speculative.run`` (the library's own path: greedy output is
the target's, token for token), while the queue, events, stop strings, llama.cpp's limits, cancellation and the
final event are the batched engine's. It suits what speculation is for: one user waiting on a large target. The
acceptance counters go to /metrics (``codellama_speculative_*``). Logprobs are reported for the chosen tokens;
the top alternatives are left empty."""

from __future__ import annotations

import time

import torch

from .scheduler import Engine, Event


class SpeculativeEngine(Engine):
    """One request at a time: a draft proposes, the target verifies (``llama.draft``, ``llama.speculative_k``)."""

    def _allocate(self) -> None:
        pass  # speculative.run allocates each request's caches (target and draft)

    def _loop(self) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._stop and not self._waiting:
                        self._cv.wait()
                    if self._stop:
                        return
                    seq = self._waiting.popleft()
                    self._admitting = 1
                try:
                    if seq.cancelled:
                        self._finish(seq, "cancelled")
                        continue
                    self._rows = [seq]
                    self._generate(seq)
                except Exception as e:  # e.g. out of memory for a long prompt: fail that request only
                    self.stats.errors += 1
                    self._fail(seq, f"generation failed: {type(e).__name__}: {e}")
                finally:
                    with self._cv:
                        self._admitting = 0
                        self._rows = []

    def _generate(self, seq) -> None:
        from ..speculative import run

        request = seq.request
        request.logprobs = seq.top_logprobs is not None
        request.prompt_logprobs = seq.prompt_logprobs
        seq.prefill_started = time.perf_counter()
        draft = self.llama.draft
        steps, stats = run(self.model, draft.model, [request], k=self.llama.speculative_k,
                           kv_cache_dtype=self._kv_dtype, draft_kv_cache_dtype=draft.kv_cache_dtype)
        self.stats.prefills += 1
        self.stats.prompt_tokens += len(seq.job.prompt)
        if seq.prompt_logprobs:
            seq.prompt_top = [[] for _ in seq.job.prompt]
        if seq.generate:
            for appended in steps:
                now = time.perf_counter()
                for _, tok in appended:
                    if seq.first_token_at is None:
                        seq.first_token_at = now
                    self._emit(seq, tok, now)
                if seq.cancelled and not request.finished:
                    request.finish("cancelled")  # the generator stops before its next token
        done = stats[0]
        self.stats.speculative_proposed += done.proposed
        self.stats.speculative_accepted += done.accepted
        self.stats.speculative_rounds += done.rounds
        self._finish(seq, "cancelled" if seq.cancelled and request.finish_reason == "cancelled" else None)

    def _emit(self, seq, tok: int, now: float) -> None:
        """What ``Engine._advance`` sends for a token that ``speculative.run`` has already appended (its iterator
        yields appended tokens only: a stop token ends the request unyielded)."""
        seq._next = tok
        seq.n_decoded += 1
        request = seq.request
        self.stats.generated_tokens += 1
        event = Event(tokens=[tok])
        if request.logprobs and request.token_logprobs:
            event.logprobs.append(request.token_logprobs[-1])
            event.top.append([])
            seq.generated_top.append([])
        event.text = seq.text.push(tok)
        if seq.text.stopped:
            request.finish("stop")
        if seq.has_limits:
            event.text = seq.deliver(event.text, now)
        self._send(seq, event)


__all__ = ["SpeculativeEngine"]
