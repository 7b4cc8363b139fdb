"""Serving a tensor-parallel model, the channel: rank 0 runs the HTTP server and the scheduler (``Engine``), every other rank
runs a ``FollowerEngine`` that replays rank 0's engine step for step, so that each forward's collectives meet.

Rank 0 decides everything that is not a pure function of the model's numbers: which newcomers to admit, the
tokens chosen (sampling, stop strings, time limits, cancellations from clients that left) and which rows are
freed. It broadcasts each decision at the point where it takes it, tagged, and the followers apply it to their
own copy of the state (rows, lengths, padding, the prefix-cache table), which therefore stays equal to rank 0's:
every follower runs the same prefills, the same batched decode steps and the same row moves on its shard of the
KV cache. Messages per scheduler iteration: the plan (admitted prompts), the outcome of every sampling, and the
flags of the rows before each clean-up. An idle rank 0 sends an empty plan every ``HEARTBEAT_S`` seconds, which
keeps the followers inside the process group's timeout; a stopping one sends ``stop``.

A follower that receives a message it does not expect raises: the group fails loudly rather than computing on
diverged state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from ..errors import CodeLlamaError

HEARTBEAT_S = 5.0


class Lockstep:
    """Rank 0's side (``send``) or a follower's (``recv``) of the engine's decision stream."""

    def __init__(self) -> None:
        self.rank = dist.get_rank()
        self.messages = 0

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def send(self, tag: str, payload: Any = None) -> None:
        dist.broadcast_object_list([(tag, payload)], src=0)
        self.messages += 1

    def recv(self, expect: str) -> Any:
        box = [None]
        dist.broadcast_object_list(box, src=0)
        self.messages += 1
        tag, payload = box[0]
        if tag == "stop":
            raise Stopped()
        if tag != expect:
            raise CodeLlamaError(f"the engine expected {expect!r} from rank 0 but got {tag!r}; the ranks' states "
                                 "differ, stopping")
        return payload


class Stopped(Exception):
    """Rank 0's engine stopped: a follower's replay ends."""


@dataclass
class Spec:
    """What a follower needs of an admitted sequence to run the same prefill."""
    prompt: list[int]
    max_new_tokens: int
    cache_prompt: bool
    slot: int | None
    prompt_logprobs: bool
    top_logprobs: int | None
    generate: bool


def spec_of(seq) -> Spec:
    return Spec(list(seq.job.prompt), seq.request.max_new_tokens, seq.cache_prompt, seq.slot, seq.prompt_logprobs,
                seq.top_logprobs, seq.generate)


def flags_of(seq) -> tuple:
    return seq.request.finish_reason, seq.cancelled, seq.failed


__all__ = ["HEARTBEAT_S", "Lockstep", "Spec", "Stopped", "flags_of", "spec_of"]
