"""The generation settings that llama.cpp's ``/slots`` and ``/props`` report, from our ``SamplingParams``
(llama.cpp's names: ``repeat_penalty``, ``repeat_last_n``, ``n_predict`` ...)."""

from __future__ import annotations

from ..sampling import SamplingParams
from .prefix_cache import RowTable


def slot_params(params: SamplingParams, n_predict: int, seq=None) -> dict:
    """One slot's ``params`` object (``seq``: the running ``Sequence``, for its stop strings and limits)."""
    return {
        "n_predict": n_predict, "seed": params.seed if params.seed is not None else -1,
        "temperature": params.temperature, "top_k": params.top_k, "top_p": params.top_p, "min_p": 0.0,
        "repeat_last_n": params.penalty_last_n, "repeat_penalty": params.repetition_penalty,
        "presence_penalty": params.presence_penalty, "frequency_penalty": params.frequency_penalty,
        "stop": list(seq.text.stop) if seq is not None else [],
        "n_indent": seq.n_indent if seq is not None else 0,
        "t_max_predict_ms": seq.t_max_predict_ms if seq is not None and seq.t_max_predict_ms else -1,
        "cache_prompt": seq.cache_prompt if seq is not None else False,
        "stream": True,
    }


def default_params() -> dict:
    """The settings of a request that sets nothing (our defaults: greedy, no penalties)."""
    return slot_params(SamplingParams(), -1)


def slot_views(table: RowTable, rows: list, n_ctx: int) -> list[dict]:
    """One llama.cpp ``/slots`` object per slot id: the running sequence's state, or the free row's cache."""
    out = []
    for label in range(table.size):
        row = table.labels.index(label)
        seq = rows[row] if row < len(rows) else None
        cached = table.tokens[row] if seq is None else None
        out.append({
            "id": label, "id_task": seq.task_id if seq is not None else -1, "n_ctx": n_ctx,
            "speculative": False, "is_processing": seq is not None,
            "n_prompt_tokens": len(seq.job.prompt) if seq is not None else 0,
            "n_prompt_tokens_cached": seq.tokens_cached if seq is not None else len(cached or ()),
            "params": slot_params(seq.request.sampling, seq.request.max_new_tokens, seq) if seq is not None
            else default_params(),
            "next_token": {"has_next_token": seq is not None and not seq.request.finished,
                           "has_new_line": bool(seq is not None and seq._seen_newline),
                           "n_remain": seq.request.max_new_tokens - len(seq.request.tokens) if seq is not None
                           else -1,
                           "n_decoded": seq.n_decoded if seq is not None else 0}})
    return out
