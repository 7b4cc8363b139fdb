"""Throughput: a concurrency sweep through the serving engine (the scheduler ``codellama serve`` runs).

For each concurrency ``c``, an engine with ``c`` cache rows serves ``c × rounds`` requests of the same multi-file
prompt, all submitted together, so ``c`` decode in each batched step and the rest queue. Per request we record
time to first token (from submission, so queueing counts, as a client sees it) and the gaps between its tokens.
Reported per concurrency: output tokens/s and requests/s over the wall time, TTFT and per-token latency p50/p90/p99.
The sweep stops at the first concurrency whose KV cache does not fit (the engine refuses it at start).

``predict_row`` is the performance model's figure for the same run: the engine prefills each newcomer alone and
then decodes its rows together, so ``c × rounds`` requests take ``rounds × (c × prefill + (n − 1) × step(c))``
with ``step(c)`` one decode step of ``c`` sequences at the mean cache length (``perf_model.predict``)."""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import asdict, dataclass

from ..errors import CodeLlamaError


@dataclass
class ThroughputRow:
    concurrency: int
    requests: int
    output_tokens: int
    wall_s: float
    tokens_per_s: float
    requests_per_s: float
    ttft_p50_s: float
    ttft_p90_s: float
    tpot_p50_s: float
    tpot_p90_s: float
    tpot_p99_s: float

    def to_json(self) -> dict:
        return asdict(self)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run_concurrency(llama, prompt_text: str, concurrency: int, output_tokens: int, rounds: int = 1,
                    threads: int | None = None) -> ThroughputRow:
    """Serve ``concurrency × rounds`` greedy requests of ``prompt_text`` through an engine of ``concurrency``
    rows; every request generates ``output_tokens`` (eos does not stop it). ``threads``: the engine thread's
    torch threads, as ``codellama serve --threads`` sets them (OpenMP's setting is per thread)."""
    from ..serving.scheduler import Engine
    from ..serving.sequences import build_job, make_sequences

    if concurrency < 1 or rounds < 1 or output_tokens < 1:
        raise CodeLlamaError("concurrency, rounds and output tokens must be >= 1")
    n = concurrency * rounds
    job = build_job(llama, "complete", prompt=prompt_text)
    # Cache rows sized to the workload, as vLLM's max_model_len: concurrency × (prompt + output) slots.
    context = min(llama.config.max_seq_len, len(job.prompt) + output_tokens + 1)
    engine = Engine(llama, max_batch_size=concurrency, max_queue=n, context=context, threads=threads)
    first: dict[int, float] = {}
    marks: dict[int, list[float]] = {i: [] for i in range(n)}
    counts = [0] * n
    done = threading.Semaphore(0)
    failures: list[str] = []

    def sink_for(i: int):
        def sink(_choice: int, event) -> None:
            now = time.perf_counter()
            if event.tokens:
                first.setdefault(i, now)
                marks[i].extend([now] * len(event.tokens))
                counts[i] += len(event.tokens)
            if event.done:
                if event.error:
                    failures.append(event.error)
                done.release()
        return sink

    sequences = [make_sequences(llama, job, max_tokens=output_tokens, sink=sink_for(i), shrink_max_tokens=True)[0]
                 for i in range(n)]
    for seq in sequences:  # every request generates output_tokens (vLLM's --ignore-eos): rows stay comparable
        seq.request.stop_ids = frozenset()
    engine.start()
    try:
        t0 = time.perf_counter()
        engine.submit(sequences)
        for _ in range(n):
            if not done.acquire(timeout=3600):
                raise CodeLlamaError("the throughput run timed out")
        wall = time.perf_counter() - t0
    finally:
        engine.stop()
    if failures:
        raise CodeLlamaError(f"{len(failures)} of {n} requests failed: {failures[0]}")
    ttfts = [first[i] - t0 for i in range(n) if i in first]
    gaps = [b - a for ms in marks.values() for a, b in zip(ms, ms[1:]) if b > a]
    tokens = sum(counts)
    return ThroughputRow(concurrency, n, tokens, wall, tokens / wall, n / wall,
                         statistics.median(ttfts) if ttfts else float("nan"), _percentile(ttfts, 0.9),
                         _percentile(gaps, 0.5), _percentile(gaps, 0.9), _percentile(gaps, 0.99))


def predict_row(config, hardware, dtype: str, context: int, concurrency: int, output_tokens: int,
                rounds: int = 1) -> dict:
    """Predicted wall time, output tokens/s and requests/s of ``run_concurrency`` on ``hardware``."""
    from .perf_model import predict

    first = predict(config, context, batch=1, dtype=dtype, hardware=hardware)
    step = predict(config, context + output_tokens // 2, batch=concurrency, dtype=dtype, hardware=hardware)
    wall = rounds * (concurrency * first.prefill_s + (output_tokens - 1) * step.decode_s_per_token)
    n = concurrency * rounds
    return {"wall_s": wall, "tokens_per_s": n * output_tokens / wall, "requests_per_s": n / wall}


def sweep(llama, prompt_text: str, concurrencies: list[int], output_tokens: int, rounds: int = 1,
          log=lambda row: None, threads: int | None = None) -> list[ThroughputRow]:
    """``run_concurrency`` for each value, stopping at the first one the device's memory refuses."""
    rows = []
    for c in concurrencies:
        try:
            row = run_concurrency(llama, prompt_text, c, output_tokens, rounds, threads)
        except (CodeLlamaError, RuntimeError) as e:  # RuntimeError: the allocator's out-of-memory
            if "memory" in str(e).lower() and rows:
                break  # the memory limit: what fits has been measured
            raise
        rows.append(row)
        log(row)
    return rows
