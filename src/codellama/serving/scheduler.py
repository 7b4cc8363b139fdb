"""Continuous batching: one background thread owns the model and a KV cache of ``max_batch_size`` rows.

Between two decode steps it admits waiting sequences — each newcomer is prefilled alone into a free cache
row and samples its first token — then advances every active row by one token in a single batched forward.
Rows have their own lengths, so sequences join and leave at any step; a finished, stopped or cancelled
sequence frees its row at once (the last active row is moved into the hole, so active rows are always
``0..n-1`` and the batched step works on views, never on gathered copies of the cache).

Per-sequence logic (``sequences.py``) is the generation engine's (``Request``, ``accept_token``, ``sample``,
``TextStream`` for exact text deltas and stop strings); a newcomer's prefill is the same ``forward_step`` call a
solo run makes, so greedy output matches ``CodeLlama.complete/infill/chat`` run alone. Results leave the thread as
``Event`` objects through each sequence's ``sink`` (a thread-safe callable: the HTTP layer hands in one that
posts to its asyncio loop).

llama.cpp's server features live beside it: prefix caching and slot ids (``prefix_cache.py``, used by the
prefill in ``prefill.py``), the FIM time and indentation limits and the timings (``Sequence.deliver``,
``sequences.timings``), the ``/slots`` view (``slots.py``). Rows that ask for repetition penalties or banned ids
get their logits adjusted before the choice (``sampling.adjust_logits``, as the library's loop does); the others
keep the batched greedy argmax."""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import CodeLlamaError
from ..generation_forward import local_heads, one_query_attention
from ..generation import (DEFAULT_PREFILL_CHUNK, _completion, accept_token, available_memory, decoder_for,
                          resolve_kv_cache_dtype)
from ..model import (KVCache, apply_rope, dequantize_kv, kv_bytes_per_token, kv_rotation, quantize_kv, rope_angles,
                     rotate_kv)
from ..sampling import adjust_logits, sample_row
from .prefill import PREFILL_BUCKET, PrefillMixin
from .prefix_cache import RowTable, exchange_rows
from .lockstep import HEARTBEAT_S, flags_of, spec_of
# What the engine runs lives in sequences.py; re-exported because callers build sequences for this engine.
from .sequences import (Event, QueueSink, Sequence, build_job, make_sequences, timings,  # noqa: F401
                        token_text, truncated_infill_job)
from .slots import default_params, slot_views

# Waiting sequences beyond this many make ``submit`` raise ``QueueFull`` (the server answers 503).
DEFAULT_MAX_QUEUE = 64
# A newcomer's prompt tokens prefilled per scheduler iteration before the running rows get their next step;
# at least one newcomer is admitted per iteration whatever its length.
DEFAULT_PREFILL_BUDGET = 2048
MAX_TOP_LOGPROBS = 20


class QueueFull(CodeLlamaError):
    """The wait queue is at capacity: retry later."""


class EngineStopped(CodeLlamaError):
    """The engine has been shut down."""


@dataclass
class EngineStats:
    """Counters the engine keeps for /metrics (read without a lock: single ints/floats)."""

    steps: int = 0
    prefills: int = 0
    prompt_tokens: int = 0  # prompt tokens evaluated (those reused from a prefix cache excluded)
    prompt_tokens_cached: int = 0  # prompt tokens reused from a prefix cache
    generated_tokens: int = 0
    finished: int = 0
    cancelled: int = 0
    errors: int = 0
    batch_rows_sum: int = 0  # sum over steps of active rows: mean batch = batch_rows_sum / steps
    speculative_proposed: int = 0  # serve --draft (speculative_engine.py): tokens the draft proposed
    speculative_accepted: int = 0  # ... and the target kept
    speculative_rounds: int = 0  # target verify forwards


class Engine(PrefillMixin):
    """The continuous-batching scheduler. ``start()`` launches the thread; ``submit()`` queues sequences."""

    def __init__(self, llama, *, max_batch_size: int = 16, max_queue: int = DEFAULT_MAX_QUEUE,
                 context: int | None = None, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 prefill_budget: int = DEFAULT_PREFILL_BUDGET, pack: bool | None = None, threads: int | None = None,
                 kv_cache_dtype: str | None = None, lockstep=None):
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise CodeLlamaError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
        if not isinstance(max_queue, int) or max_queue < 0:
            raise CodeLlamaError(f"max_queue must be an integer >= 0, got {max_queue!r}")
        if not isinstance(prefill_chunk, int) or prefill_chunk < 1 or prefill_chunk % PREFILL_BUCKET:
            raise CodeLlamaError(f"prefill_chunk must be a positive multiple of {PREFILL_BUCKET}, "
                                 f"got {prefill_chunk!r}")
        self.llama = llama
        self.model = llama.model
        c = self.model.config
        self.context = min(context or c.max_seq_len, c.max_seq_len)
        if self.context < 2:
            raise CodeLlamaError(f"context must be at least 2 tokens, got {self.context}")
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.prefill_budget = prefill_budget
        self.pack = pack
        self.threads = threads  # torch intra-op threads for the engine thread (None: torch's default)
        self.stats = EngineStats()
        self._device = self.model.output.weight.device
        self._dtype = self.model.output.weight.dtype
        # The KV cache's storage: the engine's own setting, else the loaded model's (load(kv_cache_dtype=...)).
        if kv_cache_dtype is None:
            kv_cache_dtype = getattr(llama, "kv_cache_dtype", None)
        self._kv_dtype = resolve_kv_cache_dtype(kv_cache_dtype, self._dtype)
        self._check_memory()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._rows: list[Sequence] = []  # active sequences; self._rows[i] lives in cache row i
        self._admitting = 0  # taken from the queue, not yet in a row (still counts against free rows)
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._cache: KVCache | None = None
        self._lens: Tensor | None = None  # per row: the next free slot
        self._pads: Tensor | None = None  # per row: padding slots before the prompt
        self._table = RowTable(max_batch_size)  # slot ids and cached prompts of the rows (prefix_cache.py)
        self._claimed: set[int] = set()  # slot ids that admitted id_slot requests will run in
        self._task_ids = 0
        # Tensor parallelism (lockstep.py): rank 0's engine broadcasts each decision its followers replay.
        self.lockstep = lockstep

    # ---- public, any thread ------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._rows)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def n_ctx(self) -> int:
        return self.context

    def slots(self) -> list[dict]:
        """llama.cpp's ``GET /slots``: one object per slot (cache row), by slot id. A snapshot taken without
        stopping the engine: counts may be one step old."""
        return slot_views(self._table, list(self._rows), self.context)

    def props(self) -> dict:
        """What llama.cpp's ``GET /props`` reports about the engine: context, slots, default settings."""
        speculative = getattr(self.llama, "draft", None) is not None
        return {"default_generation_settings": {"id": 0, "id_task": -1, "n_ctx": self.context,
                                                "speculative": speculative, "is_processing": False,
                                                "params": default_params()},
                "total_slots": self.max_batch_size, "n_ctx": self.context, "model_path": self.llama.name}

    def start(self) -> "Engine":
        if self.running:
            return self
        self._stop = False
        self._allocate()
        self._thread = threading.Thread(target=self._loop, name="codellama-engine", daemon=True)
        self._thread.start()
        return self

    def _allocate(self) -> None:
        # The cache is allocated once: memory use is flat however many requests come and go.
        self._cache = KVCache.for_model(self.model, self.max_batch_size, self.context, device=self._device,
                                        dtype=self._kv_dtype)
        self._lens = torch.zeros(self.max_batch_size, dtype=torch.long, device=self._device)
        self._pads = torch.zeros(self.max_batch_size, dtype=torch.long, device=self._device)
        self._table.reset()
        self._claimed = set()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread; sequences still queued or running get a final event with an error."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self._thread = None
        for seq in list(self._waiting) + self._rows:
            self._fail(seq, "the server is shutting down")
        self._waiting.clear()
        self._rows = []
        self._cache = None

    def submit(self, sequences: list[Sequence]) -> None:
        """Queue sequences (all or none). Raises ``QueueFull`` when they would not fit in the queue."""
        for seq in sequences:
            P = len(seq.job.prompt)
            if P >= self.context:
                raise CodeLlamaError(f"the prompt is {P} tokens but the context is {self.context} tokens")
            if seq.slot is not None and seq.slot >= self.max_batch_size:
                raise CodeLlamaError(f"id_slot must be -1 or a slot id in [0, {self.max_batch_size}), "
                                     f"got {seq.slot}")
            # Room for the prompt and what is generated (the last token is never fed back).
            room = self.context - P
            asked = seq.request.max_new_tokens
            if asked > room and seq.generate and not (seq.until_context_end or seq.shrink_max_tokens):
                raise CodeLlamaError(f"the prompt is {P} tokens and max_tokens is {asked}: {P + asked} tokens, "
                                     f"more than the context of {self.context} tokens; ask for at most {room}")
            seq.request.max_new_tokens = min(asked, room)
        with self._cv:
            if self._stop or not self.running:
                raise EngineStopped("the engine is not running")
            free = self.max_batch_size - len(self._rows) - self._admitting
            if len(self._waiting) + len(sequences) > self.max_queue + max(free, 0):
                raise QueueFull(f"the server is busy ({len(self._rows)} running, {len(self._waiting)} waiting)")
            now = time.perf_counter()
            for seq in sequences:
                seq.submitted = now
                self._task_ids += 1
                seq.task_id = self._task_ids
                self._waiting.append(seq)
            self._cv.notify_all()

    # ---- the engine thread ---------------------------------------------------------------------------
    def _check_memory(self) -> None:
        kv = self.max_batch_size * self.context * kv_bytes_per_token(self.model.config, self._kv_dtype)
        free = available_memory(self._device)
        if free is not None and kv > free:
            raise CodeLlamaError(f"the KV cache for {self.max_batch_size} x {self.context} tokens needs "
                                 f"{kv / 2**30:.2f} GiB but {free / 2**30:.2f} GiB is free; lower "
                                 "--max-batch-size or --context")

    def _loop(self) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            c = self.model.config
            cos, sin = rope_angles(torch.arange(self.context, device=self._device).unsqueeze(0), c.head_dim,
                                   c.rope_theta)
            self._rope = (cos[0], sin[0])
            dec, dec_checked = None, 0.0
            while True:
                with self._cv:
                    while not self._stop and not self._waiting and not self._rows:
                        if not self._cv.wait(HEARTBEAT_S if self.lockstep else None):
                            break  # idle: an empty plan keeps the followers within the group's timeout
                    if self._stop:
                        if self.lockstep:
                            self.lockstep.send("stop")
                        return
                    admitted = self._take_newcomers()
                if self.lockstep:
                    self.lockstep.send("plan", [spec_of(s) for s in admitted])
                try:
                    # decoder_for checks every weight's version (a model updated in place needs a new packed
                    # copy); a served model does not change, so that check runs once a second, not per step.
                    if dec is None or time.monotonic() - dec_checked > 1.0:
                        dec, dec_checked = decoder_for(self.model, self.pack), time.monotonic()
                except Exception as e:  # cannot build the forward at all: fail the newcomers, retry next time
                    self.stats.errors += 1
                    with self._cv:
                        self._admitting = 0
                    for seq in admitted:
                        self._fail(seq, f"generation failed: {type(e).__name__}: {e}")
                    continue
                for seq in admitted:
                    try:
                        self._prefill(dec, seq)
                    except Exception as e:  # e.g. out of memory for a long prompt: fail that request only
                        self.stats.errors += 1
                        if seq in self._rows:  # it is the last row
                            self._rows.pop()
                        self._fail(seq, f"generation failed: {type(e).__name__}: {e}")
                    finally:
                        with self._cv:
                            self._admitting -= 1
                try:
                    self._drop_finished()
                    if self._rows:
                        self._decode(dec)
                        self._drop_finished()
                except Exception as e:  # a bug or out of memory: fail what is running, keep serving
                    self.stats.errors += 1
                    for seq in self._rows:
                        self._fail(seq, f"generation failed: {type(e).__name__}: {e}")
                    self._rows = []

    def _take_newcomers(self) -> list[Sequence]:
        # Called with the lock held: pop cancelled waiters, then admit while rows and the budget allow.
        for seq in [s for s in self._waiting if s.cancelled]:
            self._waiting.remove(seq)
            self._finish(seq, "cancelled")
        admitted, budget, deferred = [], self.prefill_budget, []
        while self._waiting and len(self._rows) + len(admitted) < self.max_batch_size:
            seq = self._waiting[0]
            n = len(seq.job.prompt)
            if admitted and n > budget:
                break
            self._waiting.popleft()
            if seq.slot is not None and seq.slot >= 0:
                # llama.cpp defers a request for a busy slot until that slot is free; others go ahead of it.
                if seq.slot in self._claimed or self._table.row_of(seq.slot) < len(self._rows):
                    deferred.append(seq)
                    continue
                self._claimed.add(seq.slot)
            admitted.append(seq)
            budget -= n
        self._waiting.extendleft(reversed(deferred))
        self._admitting = len(admitted)
        return admitted

    def _decode(self, dec) -> None:
        """One token for every active row, in one batched forward with per-row cache positions."""
        n = len(self._rows)
        H, KV, hd = local_heads(self.model)
        cache = self._cache
        pos = self._lens[:n]  # the slot each row's new token is written to
        pads = self._pads[:n]  # each row's padding slots at the front (not attended, not counted in positions)
        tokens = torch.tensor([s._next for s in self._rows], device=self._device).view(n, 1)
        keys = int(pos.max()) + 1
        # Each row sees its own slots from its first real token up to its new token; later slots are unused.
        slots = torch.arange(keys, device=self._device).unsqueeze(0)
        mask = ((slots <= pos.unsqueeze(1)) & (slots >= pads.unsqueeze(1))).view(n, 1, 1, keys)
        rope_pos = pos - pads
        cos, sin = self._rope[0][rope_pos].unsqueeze(1), self._rope[1][rope_pos].unsqueeze(1)  # [n, 1, hd/2]
        rows = torch.arange(n, device=self._device)
        quantized = cache.k.dtype == torch.int8
        rotation = kv_rotation(hd, self._device) if quantized else None
        h = self.model.tok_embeddings(tokens)
        small_attention = h.device.type == "cpu" and h.dtype in (torch.bfloat16, torch.float16)
        for i, (layer, ops) in enumerate(zip(self.model.layers, dec.layers)):
            q, k, v = ops.qkv(layer.attention_norm(h))
            # One new token per row: the H/KV query heads sharing a key/value head become that head's G
            # "query positions", so attention reads the cache as it is (no repeated keys/values for GQA).
            q = apply_rope(q.view(n, 1, H, hd), cos, sin).view(n, KV, H // KV, hd)
            k = apply_rope(k.view(n, 1, KV, hd), cos, sin)
            k_cache, v_cache = cache.k[i], cache.v[i]
            if quantized:  # int8 cache (model.py): in the rotated basis, the slots up to ``keys`` dequantized
                q = rotate_kv(q, rotation)
                k_new, v_new = rotate_kv(k[:, 0], rotation), rotate_kv(v.view(n, KV, hd), rotation)
                k_cache[rows, :, pos] = quantize_kv(k_new)
                v_cache[rows, :, pos] = quantize_kv(v_new)
                keys_ = dequantize_kv(k_cache[:n, :, :keys], q.dtype)
                values = dequantize_kv(v_cache[:n, :, :keys], q.dtype)
                keys_[rows, :, pos], values[rows, :, pos] = k_new, v_new  # a token sees itself exactly, as solo
            else:
                k_cache[rows, :, pos] = k[:, 0]
                v_cache[rows, :, pos] = v.view(n, KV, hd)
                keys_, values = k_cache[:n, :, :keys], v_cache[:n, :, :keys]
            if small_attention:  # reduced precision on CPU: two matmuls beat SDPA's flash kernel 3-14x
                out = one_query_attention(q.view(n, H, 1, hd), keys_, values, mask).view(n, KV, H // KV, hd)
            else:
                out = F.scaled_dot_product_attention(q, keys_, values, attn_mask=mask)
            if rotation is not None:
                out = rotate_kv(out, rotation)
            h = h + ops.wo(out.reshape(n, 1, H * hd))
            h = h + ops.ffn(layer.ffn_norm(h))
        logits = dec.output(self.model.norm(h)).float()[:, 0]
        self._lens[:n] += 1
        self.stats.steps += 1
        self.stats.batch_rows_sum += n
        self._sample(self._rows, logits)

    def _choose(self, seq_rows: list[Sequence], logits: Tensor) -> list[int | None]:
        """Each row's next token (``None`` for a row whose sampling raised: that sequence alone fails)."""
        adjusted = [i for i, s in enumerate(seq_rows) if s.request.sampling.adjusts_logits]
        if adjusted:
            logits = self._adjusted(seq_rows, logits, adjusted)
        greedy = [i for i, s in enumerate(seq_rows) if s.request.sampling.greedy]
        chosen: list[int | None] = [None] * len(seq_rows)
        if greedy:
            # One batched argmax and one host transfer for all greedy rows (the common case).
            picked = (logits if len(greedy) == len(seq_rows) else logits[greedy]).argmax(dim=-1).tolist()
            for i, tok in zip(greedy, picked):
                chosen[i] = tok
        for i, seq in enumerate(seq_rows):
            if chosen[i] is None and not (seq.cancelled or seq.request.finished):
                try:
                    chosen[i] = sample_row(logits[i], seq.request.sampling, seq.request.generator)
                except Exception as e:
                    self._fail_row(seq, e)
        return chosen

    def _adjusted(self, seq_rows: list[Sequence], logits: Tensor, rows: list[int]) -> Tensor:
        """The logits with banned ids and repetition penalties applied to the ``rows`` that ask for them (a copy;
        logprobs are still reported from the model's own logits, as the library does)."""
        out = logits.clone()
        banned_only: dict[tuple[int, ...], list[int]] = {}
        for i in rows:
            seq = seq_rows[i]
            if seq.cancelled or seq.request.finished:
                continue
            params = seq.request.sampling
            if not params.penalized:
                # Most rows only ban the FIM sentinels: one batched fill per set of ids, not a copy per row.
                banned_only.setdefault(params.banned_ids, []).append(i)
                continue
            try:
                out[i] = adjust_logits(logits[i], seq.request.penalty_window(), params)
            except Exception as e:
                self._fail_row(seq, e)
        for banned, idx in banned_only.items():
            ids = torch.tensor(banned, device=out.device)
            out[torch.tensor(idx, device=out.device).unsqueeze(1), ids.unsqueeze(0)] = float("-inf")
        return out

    def _sample(self, seq_rows: list[Sequence], logits: Tensor) -> None:
        chosen = self._choose(seq_rows, logits)
        want = [i for i, s in enumerate(seq_rows) if s.top_logprobs is not None and chosen[i] is not None]
        lps: dict[int, tuple[float, list[tuple[int, float]]]] = {}
        if want:
            k = max(seq_rows[i].top_logprobs for i in want)
            got_lp, got_top = self._logprobs(logits[want], [chosen[i] for i in want], k)
            for j, i in enumerate(want):
                lps[i] = (got_lp[j], got_top[j][:seq_rows[i].top_logprobs])
        now = time.perf_counter()
        advanced: list[int | None] = [None] * len(seq_rows)
        for i, (seq, tok) in enumerate(zip(seq_rows, chosen)):
            if tok is None or seq.cancelled or seq.request.finished:
                continue
            if seq.first_token_at is None:
                seq.first_token_at = now
            advanced[i] = tok
            try:
                self._advance(seq, tok, *lps.get(i, (None, None)), now=now)
            except Exception as e:  # e.g. its text cannot be decoded: fail this sequence, not the batch
                self._fail_row(seq, e)
        if self.lockstep:
            self.lockstep.send("sampled", [(tok, *flags_of(seq)) for tok, seq in zip(advanced, seq_rows)])

    def _advance(self, seq: Sequence, tok: int, lp: float | None, top: list[tuple[int, float]] | None, *,
                 now: float) -> None:
        """Append one chosen token to a sequence and send what it adds."""
        seq._next = tok
        seq.n_decoded += 1
        event = Event()
        if accept_token(seq.request, tok, lp):
            self.stats.generated_tokens += 1
            event.tokens.append(tok)
            if lp is not None:
                event.logprobs.append(lp)
                event.top.append(top)
                seq.generated_top.append(top)
            event.text = seq.text.push(tok)
            if seq.text.stopped:
                seq.request.finish("stop")
            if seq.has_limits:
                event.text = seq.deliver(event.text, now)
        if event.text or event.tokens:
            self._send(seq, event)

    def _logprobs(self, logits: Tensor, chosen: list[int], k: int) -> tuple[list[float], list[list[tuple[int, float]]]]:
        # Temperature-1, unfiltered log-probabilities, as generation.token_logprobs reports them.
        logp = torch.log_softmax(logits.float(), dim=-1)
        picked = logp.gather(-1, torch.as_tensor(chosen, device=logp.device).view(-1, 1)).view(-1).tolist()
        if k <= 0:
            return picked, [[] for _ in chosen]
        values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
        return picked, tops

    def _drop_finished(self) -> None:
        """Free the rows of finished or cancelled sequences, moving the last active row into each hole."""
        if self.lockstep:  # the flags as they stand now (a client may have left since the last step)
            self.lockstep.send("rows", [flags_of(seq) for seq in self._rows])
        r = 0
        while r < len(self._rows):
            seq = self._rows[r]
            if not (seq.cancelled or seq.request.finished):
                r += 1
                continue
            last = len(self._rows) - 1
            # A cache_prompt sequence leaves its tokens in its row (now free) for the next request to reuse.
            keep = seq.cache_prompt and not seq.failed
            if r != last:
                exchange_rows(self._cache, self._lens, self._pads, self._table, r, last, keep_a=keep)
                self._rows[r] = self._rows[last]
                self._rows[r]._row = r
            self._rows.pop()
            seq._row = None
            kept = None
            if keep:  # the tokens whose keys/values the row holds (the last sampled one was never fed back)
                kept = (seq.job.prompt + seq.request.tokens)[:int(self._lens[last]) - int(self._pads[last])]
            self._table.tokens[last] = kept
            self._table.touch(last)
            if seq.failed:
                continue  # its error event is out already
            try:
                self._finish(seq, "cancelled" if seq.cancelled and not seq.request.finished else None)
            except Exception as e:  # e.g. its last text cannot be decoded: that sequence fails alone
                self._fail_row(seq, e)

    def _finish(self, seq: Sequence, reason: str | None) -> None:
        if reason == "cancelled":
            seq.request.finish("cancelled")
            self.stats.cancelled += 1
            kind = "cancelled"
        else:
            r = seq.request
            kind = seq.stop_kind or ("word" if seq.text.stopped else ("eos" if r.finish_reason == "stop"
                                                                       else "length"))
        seq.finished_at = time.perf_counter()
        tail = seq.text.flush() if kind != "cancelled" else ""
        if seq.has_limits:
            tail = seq.deliver(tail, seq.finished_at, final=True)
        self.stats.finished += 1
        self._send(seq, Event(text=tail, done=True, completion=_completion(seq.job, seq.request, seq.text, seq.echo),
                              stop_kind=kind, tokens_cached=seq.tokens_cached, timings=timings(seq),
                              id_slot=seq.id_slot))

    def _fail_row(self, seq: Sequence, error: Exception) -> None:
        """One sequence's own step raised: it gets an error event; its row is freed by ``_drop_finished``
        and the other rows go on as if it had never been there."""
        self.stats.errors += 1
        self._fail(seq, f"generation failed: {type(error).__name__}: {error}")

    def _fail(self, seq: Sequence, message: str) -> None:
        if seq.failed:
            return  # one final event per sequence
        seq.failed = True
        seq.request.finish("error")
        seq.finished_at = time.perf_counter()
        self._send(seq, Event(done=True, error=message, stop_kind="error"))

    def _send(self, seq: Sequence, event: Event) -> None:
        try:
            seq.sink(event)
        except Exception:  # the receiver is gone (e.g. its event loop closed): stop generating for it
            seq.cancelled = True
