"""Training data: tokenise the corpus once into a memory-mapped token stream, then serve packed fixed-length
sequences in a deterministic shuffled order that is a pure function of (seed, position) — which is what makes
resuming exact: the data position is just the number of sequences consumed.

Sequences start at document starts (``bos``): a window holds whole documents and the beginning of the next one,
which the following window repeats from its start. Every token therefore sees its document's beginning, and for
an infilling document that is where the format is: ``[PRE, SUF]`` (SPM) or ``[PRE] prefix [SUF]`` (PSM). Cut
anywhere, about half of the ``MID`` positions of short documents would not see which format they are in, and a
small model then learns the average of the two — in PSM it starts the middle with SPM's dummy-prefix space.

Files are cut at line boundaries into pieces of at most ``doc_chars`` characters before the FIM transform, so
that a transformed piece (prompt, middle and EOT) fits in one training sequence; a 60k-token file split at two
points would otherwise put ``PRE``, ``SUF`` and ``MID`` thousands of tokens apart, beyond any tiny model's window.
Each of ``passes`` copies of the training split gets its own document order and its own FIM draws, so a model
trained for several epochs sees each file split differently, as on-the-fly FIM would."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from ..errors import CodeLlamaError
from ..tokenizer import Tokenizer
from .corpus import CorpusConfig, CorpusStats, Document, build_corpus, read_split, write_corpus
from .fim import FIMConfig, document_rng, transform
from .tokenizer import train_tokenizer


@dataclass
class DataConfig:
    corpus: CorpusConfig
    tokenizer: str = ""  # an existing tokenizer.model to use; empty: train one on the train split
    vocab_size: int = 4096
    fim_rate: float = 0.9
    fim_spm_rate: float = 0.5
    doc_chars: int = 1200  # 0: whole files are documents
    passes: int = 1  # differently shuffled and FIM-transformed copies of the train split
    seed: int = 1234


def segment_text(text: str, max_chars: int) -> list[str]:
    """Consecutive pieces of ``text`` cut after a newline, each at most ``max_chars`` long (a longer single line
    stays whole). ``"".join(pieces) == text``."""
    if max_chars <= 0 or len(text) <= max_chars:
        return [text]
    pieces, current = [], ""
    for line in text.splitlines(keepends=True):
        if current and len(current) + len(line) > max_chars:
            pieces.append(current)
            current = ""
        current += line
    if current:
        pieces.append(current)
    return pieces


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.int32)


def tokenize_documents(tokenizer: Tokenizer, docs: Sequence[Document], out_path: str | Path, *,
                       fim: FIMConfig, doc_chars: int, passes: int, seed: int) -> dict[str, int]:
    """Write the token stream of ``passes`` copies of ``docs`` to ``out_path`` (raw little-endian array)."""
    dtype = token_dtype(tokenizer.n_words)
    counts = {"tokens": 0, "documents": 0, "psm": 0, "spm": 0, "plain": 0}
    out_path = Path(out_path)
    tmp = out_path.with_suffix(out_path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        for p in range(passes):
            order = list(range(len(docs)))
            random.Random(f"order:{seed}:{p}").shuffle(order)
            for i in order:
                for j, piece in enumerate(segment_text(docs[i].text, doc_chars)):
                    rng = document_rng(seed, hash_index(p, docs[i].path, j))
                    tokens, mode = transform(tokenizer, piece, rng, fim)
                    f.write(np.asarray(tokens, dtype=dtype).tobytes())
                    counts["tokens"] += len(tokens)
                    counts["documents"] += 1
                    counts[mode] += 1
    tmp.replace(out_path)
    return counts


def hash_index(pass_index: int, path: str, piece: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{pass_index}:{path}:{piece}".encode()).digest()[:8], "big")


def load_tokens(path: str | Path, vocab_size: int) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise CodeLlamaError(f"token file not found: {path} (prepare the data first)")
    if path.stat().st_size == 0:
        raise CodeLlamaError(f"token file {path} is empty: the corpus split has no documents")
    return np.memmap(path, dtype=token_dtype(vocab_size), mode="r")


def unigram_cross_entropy(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Loss (nats/token) of the best context-free model: train-set token frequencies (add-one smoothed)."""
    counts = np.bincount(np.asarray(train, dtype=np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[np.asarray(val, dtype=np.int64)].mean())


def _data_key(config: DataConfig) -> str:
    return json.dumps(asdict(config), sort_keys=True)


def prepare_data(config: DataConfig, data_dir: str | Path, log=print, *,
                 corpus: tuple[dict[str, list[Document]], CorpusStats] | None = None) -> dict:
    """Corpus → tokenizer → ``train.bin`` / ``val.bin`` under ``data_dir``; reused when already prepared with the
    same settings. Returns ``meta.json``'s content (counts, licence, unigram baseline). ``corpus`` is
    ``build_corpus(config.corpus)`` when the caller has built it already (a mixture builds every source's corpus
    before training their shared tokenizer)."""
    data_dir = Path(data_dir)
    meta_path = data_dir / "meta.json"
    key = _data_key(config)
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key:
            return meta
        raise CodeLlamaError(f"{data_dir} holds data prepared with other settings; use another data_dir "
                             "or delete it")
    data_dir.mkdir(parents=True, exist_ok=True)
    if corpus is None:
        log(f"collecting corpus from {config.corpus.roots}")
        corpus = build_corpus(config.corpus)
    splits, stats = corpus
    corpus_dir = write_corpus(splits, stats, data_dir / "corpus")
    tok_path = data_dir / "tokenizer.model"
    if config.tokenizer:
        src = Path(config.tokenizer)
        if not src.is_file():
            raise CodeLlamaError(f"tokenizer model not found: {src}")
        shutil.copyfile(src, tok_path)
    else:
        log(f"training a {config.vocab_size}-piece tokenizer on {stats.files['train']} files")
        try:
            train_tokenizer((d.text for d in splits["train"]), tok_path, config.vocab_size)
        except RuntimeError as e:  # sentencepiece: a vocabulary too small for the corpus's characters, or too big
            reason = str(e).splitlines()[0].rsplit("] ", 1)[-1] if str(e) else type(e).__name__
            raise CodeLlamaError(f"cannot train a {config.vocab_size}-piece tokenizer on this corpus: "
                                 f"{reason[:200]}") from None
    tokenizer = Tokenizer(tok_path)
    fim = FIMConfig(config.fim_rate, config.fim_spm_rate)
    log("tokenising")
    train_counts = tokenize_documents(tokenizer, splits["train"], data_dir / "train.bin", fim=fim,
                                      doc_chars=config.doc_chars, passes=config.passes, seed=config.seed)
    # Validation has the training mixture (FIM included) with a fixed draw, so its loss tracks the objective.
    val_counts = tokenize_documents(tokenizer, splits["val"], data_dir / "val.bin", fim=fim,
                                    doc_chars=config.doc_chars, passes=1, seed=config.seed + 1)
    train = load_tokens(data_dir / "train.bin", tokenizer.n_words)
    val = load_tokens(data_dir / "val.bin", tokenizer.n_words)
    meta = {
        "key": key, "vocab_size": tokenizer.n_words, "corpus": asdict(stats), "corpus_dir": str(corpus_dir),
        "train": train_counts, "val": val_counts,
        "chars_per_token": stats.chars["val"] / max(1, sum(len(tokenizer.encode(d.text)) for d in splits["val"])),
        "unigram_val_loss": unigram_cross_entropy(train, val, tokenizer.n_words),
    }
    meta_path.write_text(json.dumps(meta, indent=2))
    return meta


# ---- packed sequences ------------------------------------------------------------------------------------
def num_sequences(n_tokens: int, seq_len: int) -> int:
    """Non-overlapping windows of ``seq_len`` inputs (+1 target token each) in a stream of ``n_tokens``."""
    return max(0, (n_tokens - 1) // seq_len)


def sequence_starts(tokens: np.ndarray, seq_len: int, bos_id: int | None = None) -> np.ndarray:
    """Token offsets of the training windows (``seq_len`` inputs + 1 target each). Without ``bos_id``: back to
    back. With it: each window starts where the last document that it cuts begins (so that document is seen again
    whole, from its start, in the next window); a document longer than a window continues where the window ends."""
    n = len(tokens)
    if bos_id is None:
        return np.arange(num_sequences(n, seq_len), dtype=np.int64) * seq_len
    doc_starts = np.flatnonzero(np.asarray(tokens) == bos_id)
    starts, s = [], int(doc_starts[0]) if len(doc_starts) else 0
    while s + seq_len + 1 <= n:
        starts.append(s)
        end = s + seq_len
        j = int(np.searchsorted(doc_starts, end, side="right")) - 1
        s = int(doc_starts[j]) if j >= 0 and doc_starts[j] > s else end
    return np.asarray(starts, dtype=np.int64)


@lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def sequence_indices(position: int, count: int, n_seq: int, seed: int, shuffle: bool = True) -> list[int]:
    """Indices of the ``count`` sequences at stream ``position``: epoch after epoch, each a fresh permutation."""
    if n_seq <= 0:
        raise CodeLlamaError("not enough tokens for one training sequence; lower seq_len or add data")
    out = []
    for p in range(position, position + count):
        epoch, i = divmod(p, n_seq)
        out.append(int(_permutation(seed, epoch, n_seq)[i]) if shuffle else i)
    return out


def get_batch(tokens: np.ndarray, starts: Iterable[int], seq_len: int,
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets ``[B, seq_len]`` (int64) of the windows at token offsets ``starts``."""
    rows = np.stack([np.asarray(tokens[s: s + seq_len + 1], dtype=np.int64) for s in starts])
    batch = torch.from_numpy(rows)
    if torch.device(device).type == "cuda":
        batch = batch.pin_memory().to(device, non_blocking=True)
    return batch[:, :-1], batch[:, 1:]


__all__ = ["DataConfig", "prepare_data", "load_tokens", "get_batch", "sequence_indices", "num_sequences",
           "sequence_starts", "segment_text", "tokenize_documents", "unigram_cross_entropy", "read_split"]
