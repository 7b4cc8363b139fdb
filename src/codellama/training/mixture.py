"""Data mixtures: several weighted sources (paper §2: 85% code / 8% natural language about code / 7% natural
language; Python specialisation 75 / 10 / 10 / 5), one tokenizer, one deterministic training stream.

Each source is prepared as data.py prepares a corpus (collect → FIM → ``train.bin`` / ``val.bin``) in its own
directory ``data_dir/sources/<name>``, all with one tokenizer (``data_dir/tokenizer.model``): the recipe's or the
checkpoint's when given, else one trained on the union of the sources' training splits where no source
contributes more text than its weight's share of that union (so a large documentation dump given 8% does not
shape the vocabulary of a stream that is 85% code; a small source contributes all it has). FIM applies to code
sources only, as in the paper: a source whose extensions are all natural-language ones (``.md``, ``.rst``,
``.txt``, none) is trained left to right, with looser line-length filters (prose is written a paragraph a line).

The training stream is a sequence of window positions p = 0, 1, 2, ...; the window at p comes from source
``s(p)``, a pure function of (seed, p): positions come in blocks of ``MIX_BLOCK``, each holding every source's
largest-remainder quota of the block exactly, in an order shuffled by (seed, block). The k-th window drawn from a
source is that source's epoch-permuted window k (data.sequence_indices, with a seed per source), and k itself is
known from p alone (the quotas are the same in every block), so resuming is just the position and any rank can
compute any position. With no ``sources`` the recipe's ``corpus`` is the one source and everything (data_dir
layout, windows, batches) is exactly what data.py and the trainer always did."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from ..errors import CodeLlamaError
from ..tokenizer import Tokenizer
from .corpus import CorpusConfig, CorpusStats, Document, build_corpus
from .instruct import Rows, dialog_files_digest, prepare_dialog_source, read_dialogs
from .data import DataConfig, get_batch, load_tokens, prepare_data, sequence_indices, sequence_starts
from .tokenizer import train_tokenizer

if TYPE_CHECKING:
    from .recipe import TrainConfig

MIX_BLOCK = 1000  # positions per block of exact quotas: shares are exact to within 1/MIX_BLOCK per block
SINGLE_SOURCE = "corpus"  # the name of the one source of a recipe without ``sources``
DEFAULT_EXTENSIONS = (".py",)
NL_EXTENSIONS = frozenset({".md", ".rst", ".txt", ""})
# Filters for prose: a paragraph is one line in Markdown and reStructuredText, far beyond code's 1000 characters.
NL_LINE_LIMITS = {"max_line_chars": 5000, "max_mean_line_chars": 1000.0}
MIXTURE_META = "mixture.json"


@dataclass
class SourceConfig:
    """One entry of ``TrainConfig.sources``, validated (recipe.py) and with its weight normalised."""
    name: str
    corpus: list[str]
    weight: float
    extensions: list[str] = field(default_factory=lambda: list(DEFAULT_EXTENSIONS))
    dialogs: list[str] = field(default_factory=list)  # instruction JSONL files (instruct.py) instead of a corpus

    @property
    def is_dialogs(self) -> bool:
        return bool(self.dialogs)
    @property
    def natural_language(self) -> bool:
        """Prose, not code: no FIM (the paper applies it to code), prose line filters."""
        return all(e in NL_EXTENSIONS for e in self.extensions)


def source_configs(config: TrainConfig) -> list[SourceConfig]:
    """The recipe's sources with weights summing to 1; one source (``corpus``, weight 1) without ``sources``."""
    if not config.sources:
        return [SourceConfig(SINGLE_SOURCE, list(config.corpus), 1.0, list(DEFAULT_EXTENSIONS))]
    total = math.fsum(float(s["weight"]) for s in config.sources)
    return [SourceConfig(s["name"], list(s.get("corpus", [])), float(s["weight"]) / total,
                         list(s.get("extensions", DEFAULT_EXTENSIONS)),
                         [resolve_dialog_path(d) for d in s.get("dialogs", [])]) for s in config.sources]


def resolve_dialog_path(name: str) -> str:
    """A dialog file: ``instruct:NAME`` is one of the package's own (codellama/instruct_data/NAME.jsonl)."""
    if name.startswith("instruct:"):
        from .. import instruct_data
        return str(instruct_data.path(name))
    return str(Path(name).expanduser())


def source_data_config(config: TrainConfig, source: SourceConfig, tokenizer: str) -> DataConfig:
    """How one source of a mixture is prepared: the recipe's settings, FIM off and prose filters for prose."""
    corpus = CorpusConfig(roots=list(source.corpus), extensions=list(source.extensions),
                          **(NL_LINE_LIMITS if source.natural_language else {}))
    return DataConfig(corpus=corpus, tokenizer=tokenizer, vocab_size=config.vocab_size,
                      fim_rate=0.0 if source.natural_language else config.fim_rate,
                      fim_spm_rate=config.fim_spm_rate, doc_chars=config.doc_chars, passes=config.data_passes,
                      seed=config.seed)


def source_seed(seed: int, name: str) -> int:
    """The seed of a source's window order: independent sources, the same for the same recipe."""
    return int.from_bytes(hashlib.sha256(f"mixture:{seed}:{name}".encode()).digest()[:8], "big")


# ---- the stream: s(p) and k(p) -------------------------------------------------------------------------------
def block_quotas(weights: list[float], block: int = MIX_BLOCK) -> list[int]:
    """Positions of each source in a block: largest-remainder rounding of ``weight × block`` (ties: lower index),
    so the counts sum to ``block`` and each is within 1 of its exact share."""
    exact = [w * block for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[:block - sum(counts)]:
        counts[i] += 1
    return counts


class MixtureSampler:
    """``draw(p) = (source, k)``: the source of stream position ``p`` and how many windows that source gave
    before it. Pure in (seed, weights, block, p); O(block) for the first lookup in a block, O(1) after."""

    def __init__(self, weights: list[float], seed: int, block: int = MIX_BLOCK):
        if not weights or any(not (w > 0) for w in weights):
            raise CodeLlamaError(f"mixture weights must be > 0, got {weights}")
        self.seed, self.block = seed, block
        self.quotas = np.asarray(block_quotas(weights, block), dtype=np.int64)
        if (self.quotas == 0).any():  # a weight below 1/block would never be drawn: say so instead
            raise CodeLlamaError(f"mixture weight below 1/{block} of the total: {weights}")
        self._layout = np.repeat(np.arange(len(weights)), self.quotas)
        self._block_cache = lru_cache(maxsize=8)(self._compute_block)

    def _compute_block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        sources = self._layout[np.random.default_rng([self.seed, b, 0x6D6978]).permutation(self.block)]
        rank = np.empty(self.block, dtype=np.int64)  # windows of the same source earlier in the block
        for s in range(len(self.quotas)):
            where = np.flatnonzero(sources == s)
            rank[where] = np.arange(len(where))
        return sources, rank

    def draw(self, p: int) -> tuple[int, int]:
        if p < 0:
            raise CodeLlamaError(f"stream position must be >= 0, got {p}")
        b, i = divmod(p, self.block)
        sources, rank = self._block_cache(b)
        s = int(sources[i])
        return s, b * int(self.quotas[s]) + int(rank[i])

    def consumed(self, position: int) -> list[int]:
        """Windows each source has given to positions ``0 .. position - 1``."""
        b, i = divmod(position, self.block)
        counts = self.quotas * b
        if i:
            counts = counts + np.bincount(self._block_cache(b)[0][:i], minlength=len(self.quotas))
        return [int(c) for c in counts]


# ---- the data the trainer reads --------------------------------------------------------------------------------
@dataclass
class _Prepared:
    """One source's token streams and windows."""
    name: str
    weight: float
    seed: int
    train: np.ndarray
    val: np.ndarray
    starts: np.ndarray  # token offsets of the windows; for a dialog source, row numbers
    rows: Rows | None = None  # a dialog source's packed training rows (its val rows are in ``val``)


class TrainingData:
    """The prepared sources of a recipe, served as one stream of windows (``train_batch``)."""

    def __init__(self, sources: list[_Prepared], tokenizer_path: Path, seq_len: int, bos_id: int | None,
                 meta: dict, seed: int):
        self.tokenizer_path = Path(tokenizer_path)
        self.vocab_size = int(meta["vocab_size"])
        self.meta = meta
        self.seq_len, self.bos_id = seq_len, bos_id
        self.names = [s.name for s in sources]
        self.weights = [s.weight for s in sources]
        self.n_train_tokens = sum(len(s.train) if s.rows is None else int((s.rows.segments >= 0).sum())
                                  for s in sources)
        self._sources = sources
        self._single = len(sources) == 1 and sources[0].rows is None
        self.has_dialogs = any(s.rows is not None for s in sources)
        if not self._single:
            for s in sources:
                if len(s.starts) == 0:
                    raise CodeLlamaError(f"data source {s.name!r} has fewer than {seq_len + 1} training tokens: "
                                         "add data to it, lower seq_len, or remove it from the recipe's sources")
        self.sampler = MixtureSampler(self.weights, seed)
        self._perms: dict[int, tuple[int, np.ndarray]] = {}  # per source: its latest epoch's permutation

    @property
    def n_sequences(self) -> int:
        return sum(len(s.starts) for s in self._sources)

    def _window(self, s: int, k: int) -> int:
        """Token offset of source ``s``'s k-th window: as data.sequence_indices orders it, with a cache per source
        (that function's own holds 4 permutations, which more than 4 sources would evict at every window)."""
        src = self._sources[s]
        n = len(src.starts)
        epoch, i = divmod(k, n)
        cached = self._perms.get(s)
        if cached is None or cached[0] != epoch:
            cached = (epoch, np.random.default_rng([src.seed, epoch]).permutation(n))
            self._perms[s] = cached
        return int(src.starts[cached[1][i]])

    def draws(self, position: int, count: int) -> list[tuple[int, int]]:
        """``(source, token offset)`` of the windows at stream positions ``position .. position + count - 1``."""
        if self._single:
            src = self._sources[0]
            idx = sequence_indices(position, count, len(src.starts), src.seed)
            return [(0, int(src.starts[i])) for i in idx]
        out = []
        for p in range(position, position + count):
            s, k = self.sampler.draw(p)
            out.append((s, self._window(s, k)))
        return out

    def train_batch(self, position: int, count: int,
                    device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """x, y int64 ``[count, seq_len]`` of global stream positions ``position .. position + count - 1``."""
        if self._single:  # exactly the trainer's path before mixtures existed
            src = self._sources[0]
            idx = sequence_indices(position, count, len(src.starts), src.seed)
            return get_batch(src.train, src.starts[idx], self.seq_len, device)
        draws = self.draws(position, count)
        if self.has_dialogs:
            return self._batch_with_dialogs(draws, device)
        rows = np.stack([np.asarray(self._sources[s].train[o: o + self.seq_len + 1], dtype=np.int64)
                         for s, o in draws])
        batch = torch.from_numpy(rows)
        if torch.device(device).type == "cuda":
            batch = batch.pin_memory().to(device, non_blocking=True)
        return batch[:, :-1], batch[:, 1:]

    def _batch_with_dialogs(self, draws: list[tuple[int, int]], device) -> tuple[torch.Tensor, ...]:
        """(x, y, segments): dialog rows carry their segments and loss only on assistant tokens; text windows
        are one segment (id 0, plain causal attention) with every next token a target."""
        xs, ys, segs = [], [], []
        for s, o in draws:
            src = self._sources[s]
            if src.rows is not None:
                x, y, seg = src.rows.batch([o])
            else:
                row = torch.from_numpy(np.asarray(src.train[o: o + self.seq_len + 1], dtype=np.int64))[None]
                x, y, seg = row[:, :-1], row[:, 1:], torch.zeros(1, self.seq_len, dtype=torch.int64)
            xs.append(x)
            ys.append(y)
            segs.append(seg)
        return tuple(torch.cat(t).to(device) for t in (xs, ys, segs))

    def epoch(self, position: int) -> float:
        """Passes over the data at ``position``: each source's windows consumed / its windows, weighted mean
        (one source: position / windows, as the trainer always logged)."""
        if self._single:
            return position / max(1, len(self._sources[0].starts))
        consumed = self.sampler.consumed(position)
        return sum(s.weight * c / len(s.starts) for s, c in zip(self._sources, consumed))

    def val_sets(self) -> list[tuple[str, float, np.ndarray | Rows, int | None]]:
        """Per source: name, weight, validation tokens (a dialog source: its packed validation ``Rows``), bos."""
        return [(s.name, s.weight, s.val, self.bos_id) for s in self._sources]

    def describe(self) -> str:
        packing = "document-aligned" if self.bos_id is not None else "back-to-back"
        if self._single:
            s = self._sources[0]
            return (f"{len(s.train):,} train tokens ({len(s.starts):,} {packing} sequences of {self.seq_len})")
        parts = ", ".join(f"{s.name} {s.weight:.1%} ({len(s.train):,} tokens, {len(s.starts):,} sequences)"
                          if s.rows is None else f"{s.name} {s.weight:.1%} ({len(s.rows):,} packed dialog rows)"
                          for s in self._sources)
        return (f"mixture of {len(self._sources)} sources: {parts}; {self.n_train_tokens:,} train tokens, "
                f"{packing} sequences of {self.seq_len}")


# ---- preparation ------------------------------------------------------------------------------------------------
def tokenizer_texts(splits: list[list[Document]], weights: list[float]) -> list[str]:
    """The training texts of a mixture's tokenizer: each source's train documents (in corpus order) up to its
    weight's share of all of them, interleaved a document at a time (so train_tokenizer's line cap, if reached,
    cuts every source alike)."""
    total = sum(len(d.text) for docs in splits for d in docs)
    chosen = []
    for docs, w in zip(splits, weights):
        budget, taken = w * total, []
        for d in docs:
            if taken and budget <= 0:
                break
            taken.append(d.text)
            budget -= len(d.text)
        chosen.append(taken)
    out = []
    for i in range(max(map(len, chosen), default=0)):
        out.extend(texts[i] for texts in chosen if i < len(texts))
    return out


def _train_shared_tokenizer(texts: list[str], path: Path, vocab_size: int) -> None:
    try:
        train_tokenizer(texts, path, vocab_size)
    except RuntimeError as e:  # sentencepiece: a vocabulary too small for the corpus's characters, or too big
        reason = str(e).splitlines()[0].rsplit("] ", 1)[-1] if str(e) else type(e).__name__
        raise CodeLlamaError(f"cannot train a {vocab_size}-piece tokenizer on the mixture's sources: "
                             f"{reason[:200]}") from None


def _load_source(name: str, weight: float, seed: int, source_dir: Path, vocab_size: int, seq_len: int,
                 bos_id: int | None) -> _Prepared:
    train = load_tokens(source_dir / "train.bin", vocab_size)
    val = load_tokens(source_dir / "val.bin", vocab_size)
    return _Prepared(name, weight, seed, train, val, sequence_starts(train, seq_len, bos_id))


def _load_dialog_source(name: str, weight: float, seed: int, source_dir: Path) -> _Prepared:
    rows = Rows.load(source_dir / "train")
    return _Prepared(name, weight, seed, rows.tokens, Rows.load(source_dir / "val"),
                     np.arange(len(rows), dtype=np.int64), rows)


def _bos(tokenizer_path: Path, config: TrainConfig) -> int | None:
    return Tokenizer(tokenizer_path).bos_id if config.align_documents else None


def prepare_training_data(config: TrainConfig, log: Callable[[str], None],
                          tokenizer_override: str | None = None) -> TrainingData:
    """Prepare (or reuse) the recipe's data under ``config.data_dir`` and open it for training.
    ``tokenizer_override``: the tokenizer.model every source must use (the checkpoint's, decided by the trainer);
    otherwise the recipe's ``tokenizer``, else one trained here."""
    data_dir = Path(config.data_dir)
    sources = source_configs(config)
    if not config.sources:
        if (data_dir / MIXTURE_META).is_file():
            raise CodeLlamaError(f"{data_dir} holds a data mixture, and this recipe has no sources; use another "
                                 "data_dir or delete it")
        data_config = config.data_config()
        if tokenizer_override:
            data_config = replace(data_config, tokenizer=str(tokenizer_override))
        meta = prepare_data(data_config, data_dir, log=log)
        tok_path = data_dir / "tokenizer.model"
        bos_id = _bos(tok_path, config)
        source = _load_source(SINGLE_SOURCE, 1.0, config.seed, data_dir, meta["vocab_size"], config.seq_len, bos_id)
        return TrainingData([source], tok_path, config.seq_len, bos_id,
                            {**meta, "sources": {SINGLE_SOURCE: meta}, "weights": {SINGLE_SOURCE: 1.0}},
                            config.seed)
    if (data_dir / "meta.json").is_file():
        raise CodeLlamaError(f"{data_dir} holds single-source data, and this recipe has sources; use another "
                             "data_dir or delete it")
    given = str(tokenizer_override or config.tokenizer or "")
    if given and not Path(given).is_file():
        raise CodeLlamaError(f"tokenizer model not found: {given}")
    tok_path = data_dir / "tokenizer.model"
    data_configs = [source_data_config(config, s, str(tok_path)) for s in sources]
    # The weights shape the prepared data only through a tokenizer trained here: with a given one, a recipe that
    # changes only its weights reuses the data (the stream is sampled afresh from the new weights). Dialog
    # sources are packed into rows of seq_len + 1, and depend on their files' contents.
    dialogs = {s.name: dialog_files_digest(s.dialogs) for s in sources if s.is_dialogs}
    key = json.dumps({"sources": [{**asdict(s), "weight": None if given else s.weight} for s in sources],
                      # (each source's tokenizer is the shared one, however data_dir is spelled: its bytes are
                      # in "tokenizer", or it is trained from what the key already holds)
                      "data": [asdict(replace(d, tokenizer="shared")) for d in data_configs],
                      "tokenizer": given and hashlib.sha256(Path(given).read_bytes()).hexdigest(),
                      **({"dialogs": dialogs, "seq_len": config.seq_len} if dialogs else {})}, sort_keys=True)
    meta_path = data_dir / MIXTURE_META
    source_dirs = [data_dir / "sources" / s.name for s in sources]
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") != key:
            raise CodeLlamaError(f"{data_dir} holds a data mixture prepared with other settings; use another "
                                 "data_dir or delete it")
        _weigh(meta, sources)
    else:
        meta = _prepare_mixture(config, sources, data_configs, source_dirs, given, tok_path, log)
        meta["key"] = key
        tmp = meta_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, meta_path)  # written last: its presence means every source is complete
    bos_id = _bos(tok_path, config)
    prepared = [_load_dialog_source(s.name, s.weight, source_seed(config.seed, s.name), d) if s.is_dialogs
                else _load_source(s.name, s.weight, source_seed(config.seed, s.name), d, meta["vocab_size"],
                                  config.seq_len, bos_id) for s, d in zip(sources, source_dirs)]
    return TrainingData(prepared, tok_path, config.seq_len, bos_id, meta, config.seed)


def _prepare_mixture(config: TrainConfig, sources: list[SourceConfig], data_configs: list[DataConfig],
                     source_dirs: list[Path], given: str, tok_path: Path, log: Callable[[str], None]) -> dict:
    data_dir = Path(config.data_dir)
    # No mixture.json: nothing here is complete (an interrupted earlier attempt may have tokenised some sources
    # with a tokenizer since replaced), so the per-source data is rebuilt.
    shutil.rmtree(data_dir / "sources", ignore_errors=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    corpora: list[tuple[dict[str, list[Document]], CorpusStats]] = []
    for source, data_config in zip(sources, data_configs):
        if source.is_dialogs:
            log(f"reading dialog source {source.name} ({source.weight:.1%}) from {len(source.dialogs)} files")
            docs = [Document(f"{source.name}/{i}", "\n".join(m["content"] for m in d))
                    for i, d in enumerate(d for f in source.dialogs for d in read_dialogs(f))]
            corpora.append(({"train": docs}, CorpusStats()))
            continue
        log(f"collecting source {source.name} ({source.weight:.1%}) from {source.corpus}")
        corpora.append(build_corpus(data_config.corpus))
    if given:
        shutil.copyfile(given, tok_path)
    else:
        texts = tokenizer_texts([c[0]["train"] for c in corpora], [s.weight for s in sources])
        log(f"training a {config.vocab_size}-piece tokenizer on {len(texts)} documents of {len(sources)} sources")
        _train_shared_tokenizer(texts, tok_path, config.vocab_size)
    metas = {}
    tokenizer = Tokenizer(tok_path)
    for source, data_config, corpus, source_dir in zip(sources, data_configs, corpora, source_dirs):
        if source.is_dialogs:
            log(f"rendering and packing dialog source {source.name} (loss on assistant tokens only)")
            metas[source.name] = prepare_dialog_source(source.dialogs, tokenizer, config.seq_len, source_dir)
            continue
        log(f"tokenising source {source.name}" + (" (left to right: natural language)"
                                                 if source.natural_language else ""))
        metas[source.name] = prepare_data(data_config, source_dir, log=log, corpus=corpus)
    meta = {
        "vocab_size": tokenizer.n_words, "tokenizer": str(tok_path),
        "tokenizer_from": given or "trained on the sources",
        "fim": {s.name: not s.natural_language and not s.is_dialogs for s in sources},
        "licences": {s.name: metas[s.name]["licences"] if s.is_dialogs else metas[s.name]["corpus"]["sources"]
                     for s in sources},
        "train_tokens": sum(m["train"]["tokens"] for m in metas.values()),
        "sources": metas,
    }
    return _weigh(meta, sources)


def _weigh(meta: dict, sources: list[SourceConfig]) -> dict:
    """The parts of the meta that follow the recipe's current weights."""
    meta["weights"] = {s.name: s.weight for s in sources}
    # The loss of the best context-free model of the mixture's validation stream, weighted as training is.
    meta["unigram_val_loss"] = math.fsum(s.weight * meta["sources"][s.name]["unigram_val_loss"] for s in sources)
    return meta


__all__ = ["SourceConfig", "source_configs", "TrainingData", "prepare_training_data", "MixtureSampler",
           "block_quotas", "tokenizer_texts", "source_data_config", "MIX_BLOCK"]
