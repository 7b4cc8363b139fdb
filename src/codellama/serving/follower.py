"""A tensor-parallel server's ranks other than 0 (see ``lockstep.py``): the same engine state and forwards as rank
0's, driven by its broadcast decisions instead of by clients."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from ..generation import Request, accept_token
from ..model import rope_angles
from .lockstep import Lockstep, Spec, Stopped
from .scheduler import Engine


class _Replica(SimpleNamespace):
    """A follower's stand-in for a rank-0 ``Sequence``: the fields the prefill, decode and clean-up read."""


def _replica(spec: Spec) -> _Replica:
    request = Request(prompt=spec.prompt, max_new_tokens=spec.max_new_tokens)
    return _Replica(job=SimpleNamespace(prompt=spec.prompt), request=request, cache_prompt=spec.cache_prompt,
                    slot=spec.slot, prompt_logprobs=spec.prompt_logprobs, top_logprobs=spec.top_logprobs,
                    generate=spec.generate, cancelled=False, failed=False, prefill_started=None, tokens_cached=0,
                    id_slot=None, prompt_top=[], _row=None, _next=0, n_decoded=0, first_token_at=None)


class FollowerEngine(Engine):
    """A rank other than 0: the same state and forwards as rank 0's engine, driven by its broadcasts."""

    def run(self) -> None:
        """Replay rank 0's engine until it stops (on this thread; a follower serves nothing itself)."""
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        self.replay = Lockstep()  # not self.lockstep: that is the leader's side of the engine's code
        self._allocate()
        c = self.model.config
        with torch.inference_mode():
            cos, sin = rope_angles(torch.arange(self.context, device=self._device).unsqueeze(0), c.head_dim,
                                   c.rope_theta)
            self._rope = (cos[0], sin[0])
            try:
                while True:
                    self._iteration()
            except Stopped:
                return

    def _iteration(self) -> None:
        from ..generation import decoder_for

        plan = self.replay.recv("plan")
        dec = decoder_for(self.model, self.pack)
        for spec in plan:
            seq = _replica(spec)
            try:
                self._prefill(dec, seq)
            except Stopped:
                raise
            except Exception:  # rank 0 failed the same prefill (its forward ran the same collectives)
                if seq in self._rows:
                    self._rows.pop()
        self._drop_finished()
        if self._rows:
            self._decode(dec)
            self._drop_finished()

    def _sample(self, seq_rows, logits) -> None:
        for seq, (tok, reason, cancelled, failed) in zip(seq_rows, self.replay.recv("sampled")):
            if tok is not None:  # rank 0 appended it (or stopped on it): the same history, for the prefix cache
                seq._next = tok
                accept_token(seq.request, tok)
            seq.request.finish_reason = reason
            seq.cancelled, seq.failed = cancelled, failed

    def _drop_finished(self) -> None:
        for seq, (reason, cancelled, failed) in zip(self._rows, self.replay.recv("rows")):
            seq.request.finish_reason, seq.cancelled, seq.failed = reason, cancelled, failed
        super()._drop_finished()

    def _finish(self, seq, reason) -> None:
        pass  # rank 0 tells the client

    def _send(self, seq, event) -> None:
        pass

    def _fail(self, seq, message: str) -> None:
        seq.failed = True


def follow(llama, **engine_args) -> None:
    """A follower rank's whole ``codellama serve``: replay rank 0's engine until it stops."""
    FollowerEngine(llama, **engine_args).run()


__all__ = ["FollowerEngine", "follow"]
