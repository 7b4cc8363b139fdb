"""Instruction data for supervised fine-tuning (Code Llama - Instruct): dialogs rendered in the chat layouts of
formats.py, with the loss on the assistant's tokens only, packed into training rows.

A dialog is a JSONL record ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``.

- Llama 2 layout (``[INST]``/``<<SYS>>``): one sample per dialog. Each exchange is
  ``bos [INST] user [/INST] answer eos``, exactly as formats.py renders the history of a conversation. The
  answer's tokens and its eos are targets, and nothing else is.
- 70B layout (``Source:``/``<step>``, when the tokenizer has ``<step>``): the history of a conversation is
  rendered differently from the turn being generated (the reply header names its destination). So each assistant
  turn is its own sample: formats.py's prompt for that turn, then the reply and its ``<step>`` as targets.

Rows are **packed**: dialogs are placed first-fit into rows of ``seq_len + 1`` tokens, each with its own segment
id. The model attends only within a segment, and RoPE positions restart at every segment (model.py
``segments``), so a dialog's loss is the same as if it sat alone in a padded row; tests check that packed and
padded batches give the same loss. Packing is the training path. On the tiny model's instruction data, padded
rows spend most of their positions on padding (``padded_rows`` counts it), while a packed row is nearly full. Bucketed
padding would recover part of that, but every batch would then take its own shape."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from ..errors import CodeLlamaError
from ..formats import B_INST, B_SYS, E_INST, E_SYS, Message, _check_messages, inst_chat_tokens, step_chat_tokens
from ..tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
MAX_DIALOG_FILE_BYTES = 1 << 30
IGNORE = -100  # F.cross_entropy's ignore_index: positions that are not assistant tokens carry no loss
PAD_SEGMENT = -1


@dataclass
class Sample:
    """One training sample: token ids and, per token, whether predicting it carries loss."""
    tokens: list[int]
    targets: list[bool]


# ---- reading -----------------------------------------------------------------------------------------------
def read_records(path: str | Path) -> list[tuple[int, Any]]:
    """(line number, JSON value) of each non-empty line of a JSONL file; one-line errors for what is not."""
    path = Path(path).expanduser()
    try:
        if path.stat().st_size > MAX_DIALOG_FILE_BYTES:
            raise CodeLlamaError(f"{path}: dialog files are at most 1 GiB")
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CodeLlamaError(f"{path}: cannot read dialogs ({e.__class__.__name__}: {e})") from None
    records = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                records.append((n, json.loads(line)))
            except ValueError as e:
                raise CodeLlamaError(f"{path}:{n}: not JSON ({e})") from None
    return records


def read_dialogs(path: str | Path) -> list[list[Message]]:
    """The dialogs of a JSONL file, each checked (roles, content strings, an assistant turn to learn from)."""
    dialogs = [_checked(record.get("messages") if isinstance(record, dict) else None, f"{path}:{n}")
               for n, record in read_records(path)]
    if not dialogs:
        raise CodeLlamaError(f"{path}: no dialogs")
    return dialogs


def _checked(messages: Any, where: str) -> list[Message]:
    if not isinstance(messages, list) or not messages:
        raise CodeLlamaError(f"{where}: a dialog is {{\"messages\": [...]}} with at least one message")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise CodeLlamaError(f"{where}: message {i} must have a role (system, user, assistant) and string "
                                 "content")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise CodeLlamaError(f"{where}: the dialog has no assistant message to learn from")
    return out


def dialog_licences(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Per file, the licences and sources its records declare (``"licence"`` / ``"source"`` fields)."""
    out = []
    for p in paths:
        licences, sources = set(), set()
        for _, record in read_records(p):
            if isinstance(record, dict):
                licences.add(str(record.get("licence", "unstated")))
                if "source" in record:
                    sources.add(str(record["source"]))
        out.append({"path": str(p), "licences": sorted(licences), "sources": sorted(sources)})
    return out


def dialog_files_digest(paths: Iterable[str | Path]) -> str:
    """What a prepared dialog source depends on: the files' bytes (so an edited file is prepared again)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).expanduser().read_bytes())
    return h.hexdigest()


# ---- rendering ---------------------------------------------------------------------------------------------
def render_dialog(tokenizer: Tokenizer, messages: Sequence[Message]) -> list[Sample]:
    """The training samples of one dialog, in the layout the tokenizer implies (as formats.chat_tokens picks it)."""
    if tokenizer.step_id is not None:
        return _render_step(tokenizer, messages)
    return [_render_inst(tokenizer, messages)]


def _render_inst(tokenizer: Tokenizer, messages: Sequence[Message]) -> Sample:
    if messages[-1]["role"] != "assistant":
        messages = messages[:-1]  # a trailing user turn has no answer to learn
    # formats.py's own checks (roles alternating after an optional system, no special tags), on the prompt of
    # the last answer and on that answer.
    inst_chat_tokens(tokenizer, messages[:-1])
    _check_messages([{"role": "user", "content": messages[-1]["content"]}])
    turns = [dict(m) for m in messages]
    if turns[0]["role"] == "system":
        turns = [{"role": "user", "content": B_SYS + turns[0]["content"] + E_SYS + turns[1]["content"]}] + turns[2:]
    tokens: list[int] = []
    targets: list[bool] = []
    for prompt, answer in zip(turns[::2], turns[1::2]):
        exchange = tokenizer.encode(f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} ",
                                    bos=True, eos=True)
        question = tokenizer.encode(f"{B_INST} {prompt['content'].strip()} {E_INST}", bos=True)
        # The answer begins where the exchange stops agreeing with the question alone (sentencepiece merges
        # nothing across "[/INST] " and the answer's first piece, so this is len(question) in practice).
        cut = next((i for i, (a, b) in enumerate(zip(exchange, question)) if a != b), min(len(exchange),
                                                                                         len(question)))
        tokens += exchange
        targets += [False] * cut + [True] * (len(exchange) - cut)
    return Sample(tokens, targets)


def _render_step(tokenizer: Tokenizer, messages: Sequence[Message]) -> list[Sample]:
    samples = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant" or k == 0:
            continue
        prompt = step_chat_tokens(tokenizer, messages[:k])
        _check_messages([{"role": "user", "content": m["content"]}])
        reply = tokenizer.encode(m["content"].strip()) + [tokenizer.step_id]
        samples.append(Sample(prompt + reply, [False] * len(prompt) + [True] * len(reply)))
    return samples


# ---- rows --------------------------------------------------------------------------------------------------
@dataclass
class Rows:
    """Training rows of ``width = seq_len + 1`` tokens: ids, target flags, and segment ids (-1: padding)."""
    tokens: np.ndarray  # int32 [R, width]
    targets: np.ndarray  # bool [R, width]
    segments: np.ndarray  # int16 [R, width]

    def __len__(self) -> int:
        return len(self.tokens)

    def save(self, prefix: Path) -> None:
        for name in ("tokens", "targets", "segments"):
            np.save(prefix.with_name(f"{prefix.name}.{name}.npy"), getattr(self, name), allow_pickle=False)

    @classmethod
    def load(cls, prefix: Path) -> "Rows":
        arrays = {name: np.load(prefix.with_name(f"{prefix.name}.{name}.npy"), allow_pickle=False, mmap_mode="r")
                  for name in ("tokens", "targets", "segments")}
        return cls(**arrays)

    def batch(self, rows: Sequence[int], device: torch.device | str = "cpu"
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, y, segments) ``[len(rows), seq_len]``: y is the next token where it is a target of the same
        segment, IGNORE elsewhere."""
        idx = list(rows)
        tok = torch.from_numpy(np.asarray(self.tokens[idx], dtype=np.int64))
        tgt = torch.from_numpy(np.asarray(self.targets[idx], dtype=np.bool_))
        seg = torch.from_numpy(np.asarray(self.segments[idx], dtype=np.int64))
        keep = tgt[:, 1:] & (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != PAD_SEGMENT)
        y = torch.where(keep, tok[:, 1:], torch.full_like(tok[:, 1:], IGNORE))
        out = tok[:, :-1], y, seg[:, :-1]
        return tuple(t.to(device) for t in out)  # type: ignore[return-value]


def pack_rows(samples: Sequence[Sample], width: int, pad_id: int) -> tuple[Rows, int]:
    """Samples placed first-fit (in order, so deterministic) into rows of ``width`` tokens; returns the rows and
    how many samples were longer than a row (dropped: a cut dialog would teach answers without their end)."""
    rows: list[list[int]] = []
    free: list[int] = []
    placed: list[list[tuple[int, Sample]]] = []
    dropped = 0
    for sample in samples:
        n = len(sample.tokens)
        if n > width or not any(sample.targets[1:]):
            dropped += 1
            continue
        r = next((i for i, space in enumerate(free) if space >= n), None)
        if r is None:
            rows.append([])
            free.append(width)
            placed.append([])
            r = len(rows) - 1
        placed[r].append((len(placed[r]), sample))
        free[r] -= n
    return _fill(placed, width, pad_id), dropped


def padded_rows(samples: Sequence[Sample], width: int, pad_id: int) -> tuple[Rows, int]:
    """One sample a row, padded to ``width`` (the alternative to packing; same targets, same losses)."""
    kept = [s for s in samples if len(s.tokens) <= width and any(s.targets[1:])]
    return _fill([[(0, s)] for s in kept], width, pad_id), len(samples) - len(kept)


def _fill(placed: list[list[tuple[int, Sample]]], width: int, pad_id: int) -> Rows:
    R = len(placed)
    tokens = np.full((R, width), pad_id, dtype=np.int32)
    targets = np.zeros((R, width), dtype=np.bool_)
    segments = np.full((R, width), PAD_SEGMENT, dtype=np.int16)
    for r, items in enumerate(placed):
        at = 0
        for seg, sample in items:
            n = len(sample.tokens)
            tokens[r, at:at + n] = sample.tokens
            targets[r, at:at + n] = sample.targets
            segments[r, at:at + n] = seg
            at += n
    return Rows(tokens, targets, segments)


def split_dialogs(dialogs: list[list[Message]], val_fraction: float, salt: str = "instruct-split-v1"
                  ) -> tuple[list[list[Message]], list[list[Message]]]:
    """Train / validation by a hash of each dialog's text, so the split does not move when dialogs are added."""
    train, val = [], []
    for d in dialogs:
        h = hashlib.sha256((salt + json.dumps(d, sort_keys=True)).encode()).digest()
        (val if int.from_bytes(h[:8], "big") / 2**64 < val_fraction else train).append(d)
    if not val and len(train) > 1:  # a tiny set still gets one validation dialog
        val.append(train.pop())
    return train, val


def prepare_dialog_source(paths: Sequence[str | Path], tokenizer: Tokenizer, seq_len: int, out_dir: Path,
                          val_fraction: float = 0.05) -> dict:
    """Render, split and pack the dialogs of ``paths`` into ``out_dir`` (train / val rows); returns the meta."""
    dialogs = [d for p in paths for d in read_dialogs(p)]
    train, val = split_dialogs(dialogs, val_fraction)
    pad = tokenizer.eos_id
    meta: dict[str, Any] = {"kind": "dialogs", "files": [str(p) for p in paths], "dialogs": len(dialogs),
                            "licences": dialog_licences(paths)}
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, items in (("train", train), ("val", val)):
        samples = [s for d in items for s in render_dialog(tokenizer, d)]
        rows, dropped = pack_rows(samples, seq_len + 1, pad)
        if len(rows) == 0:
            raise CodeLlamaError(f"dialogs {', '.join(map(str, paths))}: no {split} dialog fits in {seq_len + 1} "
                                 "tokens")
        rows.save(out_dir / split)
        used = int((rows.segments != PAD_SEGMENT).sum())
        meta[split] = {"dialogs": len(items), "samples": len(samples), "dropped_too_long": dropped,
                       "rows": len(rows), "tokens": used, "target_tokens": int(rows.targets.sum()),
                       "fill": round(used / rows.tokens.size, 4)}
    meta["unigram_val_loss"] = _unigram_target_loss(Rows.load(out_dir / "train"), Rows.load(out_dir / "val"),
                                                    tokenizer.n_words)
    return meta


def _unigram_target_loss(train: Rows, val: Rows, vocab_size: int) -> float:
    """The loss of the best context-free model of the target tokens (train frequencies, add-one smoothed)."""
    counts = np.bincount(np.asarray(train.tokens)[np.asarray(train.targets)], minlength=vocab_size) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[np.asarray(val.tokens)[np.asarray(val.targets)]].mean())
