"""Data mixtures (training/mixture.py): exact shares, a pure and resumable stream, the single-source path equal to
the trainer's old one bit for bit, shared-tokenizer preparation of several sources, recipe validation."""

from __future__ import annotations

import gzip
import json
import math
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from codellama.errors import CodeLlamaError
from codellama.tokenizer import Tokenizer
from codellama.training import corpus as corpus_mod
from codellama.training.corpus import CorpusConfig, build_corpus, is_permissive
from codellama.training.data import get_batch, load_tokens, sequence_indices, sequence_starts
from codellama.training.mixture import (MIX_BLOCK, MixtureSampler, block_quotas, prepare_training_data,
                                        source_configs, source_seed, tokenizer_texts)
from codellama.training.recipe import TrainConfig, load_recipe

PAPER = [0.85, 0.08, 0.07]
NL_TEXT = ("The function returns a list of the values it was given, sorted from the smallest to the largest. "
           "Keys compare with the less-than operator, and equal keys keep their order, so sorting is stable.\n\n")


def test_block_quotas_are_exact_largest_remainder_counts():
    assert block_quotas(PAPER, 1000) == [850, 80, 70]
    assert block_quotas([1 / 3] * 3, 1000) == [334, 333, 333]  # ties go to the lower index
    assert block_quotas([0.75, 0.10, 0.10, 0.05], 7) == [5, 1, 1, 0]
    assert sum(block_quotas([0.5, 0.3, 0.15, 0.05], 1000)) == 1000


def test_shares_over_10000_positions_are_within_2_points_of_the_weights():
    sampler = MixtureSampler(PAPER, seed=1234)
    counts = np.bincount([sampler.draw(p)[0] for p in range(10_000)], minlength=3)
    assert counts.tolist() == [8500, 800, 700]  # 10 whole blocks: exact
    # Anywhere in the stream, not only from 0: a window across block boundaries is off by < 1 per block.
    counts = np.bincount([sampler.draw(p)[0] for p in range(123_457, 133_457)], minlength=3)
    shares = counts / 10_000
    assert np.abs(shares - PAPER).max() < 0.02
    assert np.abs(shares - PAPER).max() <= 11 / 10_000  # 11 blocks touched
    # The python-specialisation mixture, through the recipe path (weights normalised from any scale).
    config = TrainConfig(sources=[{"name": n, "corpus": ["stdlib"], "weight": w}
                                  for n, w in (("py", 75), ("code", 10), ("nl_code", 10), ("nl", 5))])
    weights = [s.weight for s in source_configs(config)]
    assert weights == [0.75, 0.10, 0.10, 0.05]
    sampler = MixtureSampler(weights, seed=config.seed)
    counts = np.bincount([sampler.draw(p)[0] for p in range(10_000)], minlength=4)
    assert counts.tolist() == [7500, 1000, 1000, 500]


def test_the_stream_is_pure_in_seed_and_position_and_resumes():
    weights = PAPER
    whole = [MixtureSampler(weights, 7).draw(p) for p in range(3000)]
    # Any order, any fresh sampler (another rank, a resumed run): the same (source, k) at each position.
    fresh = MixtureSampler(weights, 7)
    order = np.random.default_rng(0).permutation(3000)
    assert all(fresh.draw(int(p)) == whole[int(p)] for p in order)
    # k counts each source's earlier draws: the k-th window of a source is its k-th appearance in the stream.
    seen = [0, 0, 0]
    for s, k in whole:
        assert k == seen[s]
        seen[s] += 1
    assert MixtureSampler(weights, 7).consumed(3000) == seen
    assert MixtureSampler(weights, 7).consumed(1234) == np.bincount([s for s, _ in whole[:1234]],
                                                                     minlength=3).tolist()
    assert [MixtureSampler(weights, 8).draw(p) for p in range(3000)] != whole  # the seed matters


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory) -> tuple[Path, Path]:
    """A code source (20 stdlib modules) and a prose source (Markdown and text files written here)."""
    code = tmp_path_factory.mktemp("code")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for f in sorted(stdlib.glob("*.py"))[:20]:
        shutil.copyfile(f, code / f.name)
    prose = tmp_path_factory.mktemp("prose")
    for i in range(12):
        body = "".join(f"Section {i}.{j}. " + NL_TEXT for j in range(6))
        (prose / f"guide{i}.md").write_text(f"# Guide {i}\n\n{body}")
    (prose / "notes.txt").write_text(NL_TEXT * 8)
    (prose / "LICENSE.txt").write_text("Permission is hereby granted, free of charge... " * 20)  # not prose
    (prose / "package.json").write_text(json.dumps({"name": "prose", "license": "MIT"}))
    return code, prose


def _mix_config(tmp: Path, code: Path, prose: Path, **kw) -> TrainConfig:
    sources = [{"name": "code", "corpus": [str(code)], "weight": 0.8},
               {"name": "nl_about_code", "corpus": [str(prose)], "extensions": [".md", ".txt"], "weight": 0.2}]
    return TrainConfig(name="mix", data_dir=str(tmp / "data"), out_dir=str(tmp / "run"), sources=sources,
                       vocab_size=400, seq_len=32, doc_chars=200, seed=5, **kw)


def test_single_source_batches_equal_the_trainers_old_path_bit_for_bit(tmp_path, two_sources):
    code, _ = two_sources
    config = TrainConfig(name="one", data_dir=str(tmp_path / "data"), corpus=[str(code)], vocab_size=400,
                         seq_len=32, doc_chars=200, seed=3)
    data = prepare_training_data(config, log=lambda s: None)
    # The layout of today's prepared data: nothing moved, nothing added.
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == \
        ["corpus", "meta.json", "tokenizer.model", "train.bin", "val.bin"]
    # The trainer's code before mixtures, verbatim.
    tokenizer = Tokenizer(tmp_path / "data" / "tokenizer.model")
    train_tokens = load_tokens(tmp_path / "data" / "train.bin", tokenizer.n_words)
    starts = sequence_starts(train_tokens, config.seq_len, tokenizer.bos_id)
    n_seq = len(starts)
    assert n_seq > 50
    for position in (0, 8, n_seq - 3, 5 * n_seq + 11):  # first batch, a later one, across and after epochs
        idx = sequence_indices(position, 8, n_seq, config.seed)
        want = get_batch(train_tokens, starts[idx], config.seq_len, "cpu")
        got = data.train_batch(position, 8, "cpu")
        assert all(torch.equal(w, g) and g.dtype == torch.int64 for w, g in zip(want, got))
    assert data.epoch(3 * n_seq // 2) == (3 * n_seq // 2) / n_seq
    assert data.names == ["corpus"] and data.weights == [1.0] and data.n_train_tokens == len(train_tokens)
    assert data.meta["unigram_val_loss"] == json.loads((tmp_path / "data" / "meta.json").read_text())[
        "unigram_val_loss"]
    [(name, weight, val, bos)] = data.val_sets()
    assert (name, weight, bos, len(val)) == ("corpus", 1.0, tokenizer.bos_id, data.meta["val"]["tokens"])
    # Back-to-back windows (align_documents = false) too.
    flat = TrainConfig(name="one", data_dir=str(tmp_path / "data"), corpus=[str(code)], vocab_size=400,
                       seq_len=32, doc_chars=200, seed=3, align_documents=False)
    data = prepare_training_data(flat, log=lambda s: None)
    starts = sequence_starts(train_tokens, 32, None)
    idx = sequence_indices(40, 4, len(starts), 3)
    assert torch.equal(data.train_batch(40, 4)[0], get_batch(train_tokens, starts[idx], 32)[0])


def test_two_sources_prepare_with_one_tokenizer(tmp_path, two_sources):
    code, prose = two_sources
    config = _mix_config(tmp_path, code, prose)
    logs: list[str] = []
    data = prepare_training_data(config, log=logs.append)
    root = tmp_path / "data"
    assert (root / "mixture.json").is_file() and not (root / "meta.json").exists()
    shared = (root / "tokenizer.model").read_bytes()
    for name in ("code", "nl_about_code"):  # each source tokenised with the one tokenizer
        assert (root / "sources" / name / "tokenizer.model").read_bytes() == shared
        assert (root / "sources" / name / "train.bin").stat().st_size > 0
    assert data.tokenizer_path == root / "tokenizer.model" and data.vocab_size == 400
    assert data.names == ["code", "nl_about_code"] and data.weights == pytest.approx([0.8, 0.2])
    meta = data.meta
    # FIM on code only; prose is left to right (every document a plain [bos] ... [eos] one).
    assert meta["fim"] == {"code": True, "nl_about_code": False}
    code_meta, nl_meta = meta["sources"]["code"], meta["sources"]["nl_about_code"]
    assert code_meta["train"]["psm"] + code_meta["train"]["spm"] > 0.8 * code_meta["train"]["documents"]
    assert nl_meta["train"]["documents"] == nl_meta["train"]["plain"] > 0
    # Licences recorded per source: the prose directory's package.json says MIT; its LICENSE.txt is not a document.
    assert meta["licences"]["nl_about_code"][0]["licence"] == "MIT"
    assert nl_meta["corpus"]["files_seen"] == 13
    # Unigram baseline: the weighted mean of the sources', each a sane nats/token number.
    u_code, u_nl = code_meta["unigram_val_loss"], nl_meta["unigram_val_loss"]
    assert 2.0 < u_nl < u_code < math.log(400)
    assert meta["unigram_val_loss"] == pytest.approx(0.8 * u_code + 0.2 * u_nl)
    assert data.n_train_tokens == meta["train_tokens"] == code_meta["train"]["tokens"] + nl_meta["train"]["tokens"]
    sets = data.val_sets()
    assert [(n, round(w, 6), b) for n, w, _, b in sets] == [("code", 0.8, 1), ("nl_about_code", 0.2, 1)]
    assert all(len(v) == meta["sources"][n]["val"]["tokens"] > 32 for n, _, v, _ in sets)
    assert "code 80.0%" in data.describe() and "nl_about_code 20.0%" in data.describe()

    # Batches: in stream order, each row a window of the source s(p) picked, as draws() says.
    x, y = data.train_batch(100, 16)
    assert x.shape == y.shape == (16, 32) and x.dtype == torch.int64 and torch.equal(x[:, 1:], y[:, :-1])
    tokens = {n: load_tokens(root / "sources" / n / "train.bin", 400) for n in data.names}
    for row, (s, offset) in enumerate(data.draws(100, 16)):
        window = np.asarray(tokens[data.names[s]][offset: offset + 33], dtype=np.int64)
        assert torch.equal(x[row], torch.from_numpy(window[:-1])) and torch.equal(y[row], torch.from_numpy(window[1:]))
    # Resume: a fresh TrainingData (reused data) at position k continues the uninterrupted stream.
    stream = torch.cat([data.train_batch(p, 8)[0] for p in range(0, 64, 8)])
    again = prepare_training_data(config, log=logs.append)
    assert sum(line.startswith("tokenising source") for line in logs) == 2  # prepared once, reused after
    assert torch.equal(torch.cat([again.train_batch(p, 8)[0] for p in (40, 48, 56)]), stream[40:])
    assert torch.equal(again.train_batch(13, 7)[0], stream[13:20])  # any range, any batch size
    # Within a source, its k-th window is its epoch-permuted window k (data.sequence_indices, a seed per source):
    # every window once an epoch. The prose source has fewer windows than its 800 draws: two epochs and more.
    draws = again.draws(0, 4 * MIX_BLOCK)
    for s, name in enumerate(data.names):
        starts = sequence_starts(tokens[name], 32, 1)
        offsets = [o for src, o in draws if src == s]
        assert len(offsets) == (3200, 800)[s]
        assert offsets == starts[sequence_indices(0, len(offsets), len(starts), source_seed(5, name))].tolist()
    n_nl = len(sequence_starts(tokens["nl_about_code"], 32, 1))
    assert 0 < n_nl < 800 / 2
    nl_offsets = [o for src, o in draws if src == 1]
    assert len(set(nl_offsets[:n_nl])) == n_nl and sorted(nl_offsets[:n_nl]) == sorted(nl_offsets[n_nl:2 * n_nl])
    assert again.epoch(4000) == pytest.approx(0.8 * 3200 / len(sequence_starts(tokens["code"], 32, 1)) +
                                              0.2 * 800 / n_nl)


def test_mixture_with_a_given_tokenizer_and_refused_layouts(tmp_path, two_sources, tiny_tokenizer_path):
    code, prose = two_sources
    config = _mix_config(tmp_path, code, prose)
    data = prepare_training_data(config, log=lambda s: None, tokenizer_override=str(tiny_tokenizer_path))
    assert data.tokenizer_path.read_bytes() == tiny_tokenizer_path.read_bytes() and data.vocab_size == 512
    assert data.meta["tokenizer_from"] == str(tiny_tokenizer_path)
    # Another mixture, or a single-source recipe, on this data_dir: refused, not silently mixed up.
    with pytest.raises(CodeLlamaError, match="other settings"):
        prepare_training_data(config, log=lambda s: None)
    # With a given tokenizer the weights do not shape the prepared data: new weights reuse it, sampled afresh.
    reweighed = _mix_config(tmp_path, code, prose)
    reweighed.sources[1]["weight"] = 0.8
    logs: list[str] = []
    again = prepare_training_data(reweighed, log=logs.append, tokenizer_override=str(tiny_tokenizer_path))
    assert logs == [] and again.weights == pytest.approx([0.5, 0.5])
    u = {n: m["unigram_val_loss"] for n, m in again.meta["sources"].items()}
    assert again.meta["unigram_val_loss"] == pytest.approx(0.5 * u["code"] + 0.5 * u["nl_about_code"])
    assert again.meta["weights"] == {"code": 0.5, "nl_about_code": 0.5}
    single = TrainConfig(name="one", data_dir=config.data_dir, corpus=[str(code)], vocab_size=400)
    with pytest.raises(CodeLlamaError, match="holds a data mixture"):
        prepare_training_data(single, log=lambda s: None)
    with pytest.raises(CodeLlamaError, match="tokenizer model not found"):
        prepare_training_data(_mix_config(tmp_path / "b", code, prose), log=lambda s: None,
                              tokenizer_override=str(tmp_path / "missing.model"))


def test_a_source_too_small_for_a_window_is_named(tmp_path, two_sources):
    code, _ = two_sources
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    for i in range(5):
        (tiny / f"n{i}.md").write_text(f"A short note, number {i}, about code: long enough to be kept, too short "
                                       "to fill a window.\n")
    config = TrainConfig(name="mix", data_dir=str(tmp_path / "data"), vocab_size=400, seq_len=256, doc_chars=200,
                         sources=[{"name": "code", "corpus": [str(code)], "weight": 9},
                                  {"name": "notes", "corpus": [str(tiny)], "extensions": [".md"], "weight": 1}])
    with pytest.raises(CodeLlamaError, match="data source 'notes' has fewer than 257 training tokens"):
        prepare_training_data(config, log=lambda s: None)


def test_tokenizer_texts_cap_each_source_at_its_weight():
    from codellama.training.corpus import Document
    big = [Document(f"b{i}", "x" * 100) for i in range(100)]  # 10,000 characters
    small = [Document(f"s{i}", "y" * 100) for i in range(5)]  # 500 characters
    texts = tokenizer_texts([big, small], [0.1, 0.9])
    # The union is 10,500 characters: big may give ~10% of it (11 documents), small gives all it has.
    assert sum(t[0] == "x" for t in texts) == 11 and sum(t[0] == "y" for t in texts) == 5
    assert texts[:4] == ["x" * 100, "y" * 100, "x" * 100, "y" * 100]  # interleaved


def test_recipe_sources_validation():
    good = {"name": "code", "corpus": ["stdlib"], "weight": 0.85}
    assert TrainConfig(sources=[good]).sources == [good]
    assert source_configs(TrainConfig())[0].corpus == ["stdlib"]  # no sources: the recipe's corpus
    bad = [
        ([{**good, "weight": 0}], "recipe: sources[0].weight must be a finite number > 0, got 0"),
        ([{**good, "weight": -0.5}], "sources[0].weight must be a finite number > 0, got -0.5"),
        ([{**good, "weight": math.inf}], "sources[0].weight must be a finite number > 0, got inf"),
        ([{**good, "weight": "0.8"}], "sources[0].weight must be a finite number > 0, got '0.8'"),
        ([{**good, "weight": True}], "sources[0].weight must be a finite number > 0, got True"),
        ([good, {**good}], "sources[1].name must be unique among the sources, got 'code'"),
        ([{**good, "name": "Code Data"}], "sources[0].name must be 1-64 characters of a-z, 0-9, _ and -"),
        ([{**good, "name": "../x"}], "sources[0].name must be"),
        ([{**good, "corpus": []}], "sources[0].corpus must be a non-empty list"),
        ([{**good, "corpus": "stdlib"}], "sources[0].corpus must be a non-empty list"),
        ([{**good, "extensions": ["py"]}], "sources[0].extensions must be a non-empty list of file suffixes"),
        ([{**good, "wieght": 1}], "sources[0].wieght must be absent"),
        ([{"name": "code", "corpus": ["stdlib"]}], "sources[0].weight is missing"),
        ([{**good, "name": f"s{i}"} for i in range(17)], "sources must be at most 16 entries, got '17 entries'"),
        ([good, {**good, "name": "rare", "weight": 0.0005}],
         "sources[1].weight must be at least 1/1000 of the weights' sum (0.8505), got 0.0005"),
        ({"name": "code"}, "sources must be a list of tables"),
        (["stdlib"], "sources must be a list of tables"),
    ]
    for sources, message in bad:
        with pytest.raises(CodeLlamaError) as e:
            TrainConfig(sources=sources)
        assert message in str(e.value) and "\n" not in str(e.value), (sources, str(e.value))


def test_recipe_file_with_sources_tables(tmp_path):
    path = tmp_path / "mix.toml"
    path.write_text('name = "m"\n[[sources]]\nname = "code"\ncorpus = ["stdlib"]\nweight = 3\n'
                    '[[sources]]\nname = "docs"\ncorpus = ["pydoc-topics"]\nextensions = [".txt"]\nweight = 1\n')
    config = load_recipe(path)
    assert [(s.name, s.weight, s.extensions, s.natural_language) for s in source_configs(config)] == \
        [("code", 0.75, [".py"], False), ("docs", 0.25, [".txt"], True)]
    path.write_text('name = "m"\n[[sources]]\nname = "code"\ncorpus = ["stdlib"]\nweight = nan\n')
    with pytest.raises(CodeLlamaError, match=r"mix.toml: sources\[0\].weight must be a finite number > 0, got nan"):
        load_recipe(path)


MIX_RECIPES = ("code-train", "lcft", "python-specialise", "tiny-code-train", "tiny-python-specialise")


def test_bundled_mixture_recipes_load_with_the_papers_numbers():
    configs = {name: load_recipe(name) for name in MIX_RECIPES}
    assert all(c.name == n for n, c in configs.items())
    shares = {n: [round(s.weight, 4) for s in source_configs(c)] for n, c in configs.items()}
    assert shares["code-train"] == shares["tiny-code-train"] == [0.85, 0.08, 0.07]
    assert shares["python-specialise"] == shares["tiny-python-specialise"] == [0.75, 0.10, 0.10, 0.05]
    code, lcft, py = configs["code-train"], configs["lcft"], configs["python-specialise"]
    assert (code.seq_len, code.tokens_per_step, code.lr, code.warmup_steps) == (4096, 4096 * 1024, 3e-4, 1000)
    assert code.tokens_per_step * code.max_steps == pytest.approx(500e9, rel=0.01)
    assert (code.fim_rate, code.fim_spm_rate, code.beta1, code.beta2, code.weight_decay, code.grad_clip) == \
        (0.9, 0.5, 0.9, 0.95, 0.1, 1.0)
    assert code.final_lr == pytest.approx(3e-4 / 30)
    assert (lcft.seq_len, lcft.rope_theta, lcft.lr, lcft.max_steps, lcft.tokens_per_step) == \
        (16384, 1e6, 2e-5, 10_000, 16384 * 128)
    assert py.tokens_per_step * py.max_steps == pytest.approx(100e9, rel=0.01)
    assert all(configs[n].init_from == "" for n in ("code-train", "python-specialise"))  # --init PATH


def test_corpus_roots_beyond_python_code(tmp_path, monkeypatch):
    # pydoc-topics: the reference manual's help texts, PSF, prose about code.
    splits, stats = build_corpus(CorpusConfig(roots=["pydoc-topics"], extensions=[".txt"], max_line_chars=5000,
                                              max_mean_line_chars=1000.0))
    assert stats.sources[0]["licence"] == "PSF-2.0" and stats.kept > 40
    assert any(d.path == "pydoc-topics/assert.txt" for s in splits.values() for d in s)
    # debian-doc: a fake /usr/share/doc with one permissive and one copyleft package.
    doc = tmp_path / "doc"
    for pkg, licence in (("libfoo", "Expat"), ("gplthing", "GPL-2+")):
        (doc / pkg / "examples").mkdir(parents=True)
        (doc / pkg / "copyright").write_text(
            "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\n"
            f"Files: *\nCopyright: 2020 Someone\nLicense: {licence}\n\nFiles: debian/*\nLicense: BSD-3-clause\n")
        (doc / pkg / "README.md").write_text(NL_TEXT * 3)
        with gzip.open(doc / pkg / "examples" / "demo.c.gz", "wb") as f:
            f.write(b"#include <stdio.h>\nint main(void) {\n    puts(\"hello from the example\");\n    return 0;\n}\n")
        with gzip.open(doc / pkg / "changelog.Debian.gz", "wb") as f:
            f.write(b"libfoo (1.0-1) unstable; urgency=low\n" * 10)
    monkeypatch.setattr(corpus_mod, "DEBIAN_DOC_DIR", doc)
    splits, stats = build_corpus(CorpusConfig(roots=["debian-doc:*"], extensions=[".md", ".c"], min_bytes=16))
    paths = sorted(d.path for s in splits.values() for d in s)
    assert paths == ["debian-doc/libfoo/README.md", "debian-doc/libfoo/examples/demo.c"]  # .gz read as .c
    assert stats.sources == [{"name": "debian-doc/libfoo", "path": str(doc / "libfoo"), "distribution": "libfoo",
                              "version": "", "licence": "BSD-3-clause AND Expat", "files": 2}]
    with pytest.raises(CodeLlamaError, match=r"debian-doc:gplthing: licence 'BSD-3-clause AND GPL-2\+' is not"):
        build_corpus(CorpusConfig(roots=["debian-doc:gplthing"], extensions=[".md"]))
    with pytest.raises(CodeLlamaError, match="no such package documentation"):
        build_corpus(CorpusConfig(roots=["debian-doc:../etc"], extensions=[".md"]))
    # A directory that declares a copyleft licence (npm's package.json) is refused; a permissive one recorded.
    js = tmp_path / "jspkg"
    js.mkdir()
    (js / "index.js").write_text("module.exports = function add(a, b) {\n  return a + b;\n};\n" * 3)
    (js / "package.json").write_text(json.dumps({"license": "GPL-3.0-only"}))
    with pytest.raises(CodeLlamaError, match="declared licence 'GPL-3.0-only' is not"):
        build_corpus(CorpusConfig(roots=[str(js)], extensions=[".js"]))
    (js / "package.json").write_text(json.dumps({"license": "ISC"}))
    _, stats = build_corpus(CorpusConfig(roots=[str(js)], extensions=[".js"]))
    assert stats.sources[0]["licence"] == "ISC"
    assert is_permissive("BSD-2-clause AND Expat AND X11") and not is_permissive("LPGL-2.1+")
