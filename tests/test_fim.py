"""The infilling training objective: reconstruction, rates, and token layouts equal to the inference prompts."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from codellama.formats import infilling_tokens
from codellama.tokenizer import Tokenizer
from codellama.training.data import segment_text, tokenize_documents
from codellama.training.corpus import Document
from codellama.training.fim import FIMConfig, document_rng, fim_example, split_document, transform

CODE = '''def mean(xs):
    """Arithmetic mean."""
    if not xs:
        raise ValueError("empty")
    return sum(xs) / len(xs)
'''


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_path) -> Tokenizer:
    return Tokenizer(tiny_tokenizer_path)


def test_split_reconstructs_every_document():
    rng = random.Random(0)
    for n in range(300):
        text = "".join(rng.choice("ab \n\té😀") for _ in range(rng.randint(0, 40)))
        prefix, middle, suffix = split_document(text, rng)
        assert prefix + middle + suffix == text


def test_split_points_are_uniform():
    # Each cut point is uniform on [0, len]; the smaller one has mean len/3, the larger 2*len/3.
    rng = random.Random(1)
    text = "x" * 300
    firsts, seconds = [], []
    for _ in range(4000):
        p, m, _s = split_document(text, rng)
        firsts.append(len(p))
        seconds.append(len(p) + len(m))
    assert abs(sum(firsts) / 4000 - 100) < 4
    assert abs(sum(seconds) / 4000 - 200) < 4


def test_rates_over_many_documents(tok):
    modes = Counter(transform(tok, "x = 1\n", document_rng(7, i))[1] for i in range(5000))
    fim = modes["psm"] + modes["spm"]
    assert abs(fim / 5000 - 0.9) < 0.015
    assert abs(modes["spm"] / fim - 0.5) < 0.025
    none = Counter(transform(tok, "x = 1\n", document_rng(7, i), FIMConfig(rate=0.0))[1] for i in range(200))
    assert none == {"plain": 200}


@pytest.mark.parametrize("suffix_first", [False, True])
def test_layouts_equal_inference_prompts(tok, suffix_first):
    mode = "spm" if suffix_first else "psm"
    rng = random.Random(3)
    for _ in range(50):
        prefix, middle, suffix = split_document(CODE, rng)
        tokens = fim_example(tok, prefix, middle, suffix, mode)
        prompt = infilling_tokens(tok, prefix, suffix, suffix_first=suffix_first)
        assert tokens[:len(prompt)] == prompt
        assert tokens[len(prompt):] == tok.encode_infilling(middle) + [tok.eot_id]
        # The middle decodes back exactly, leading spaces of indented code included.
        assert tok.decode_infilling(tokens[len(prompt):-1]) == middle


def test_psm_and_spm_concrete_layout(tok):
    t = tok
    psm = fim_example(t, "def f():\n", "    return 1", "\n", "psm")
    assert psm == ([t.bos_id, t.prefix_id] + t.encode("def f():\n") + [t.suffix_id] + t.encode_infilling("\n")
                   + [t.middle_id] + t.encode_infilling("    return 1") + [t.eot_id])
    spm = fim_example(t, "def f():\n", "    return 1", "\n", "spm")
    assert spm == ([t.bos_id, t.prefix_id, t.suffix_id] + t.encode_infilling("\n") + [t.middle_id]
                   + t.encode("def f():\n") + t.encode_infilling("    return 1") + [t.eot_id])
    assert t.decode_infilling(t.encode_infilling("    return 1")) == "    return 1"


def test_plain_documents_are_bos_doc_eos(tok):
    tokens, mode = transform(tok, CODE, random.Random(0), FIMConfig(rate=0.0))
    assert mode == "plain"
    assert tokens == [tok.bos_id] + tok.encode(CODE) + [tok.eos_id]


def test_transform_is_deterministic(tok):
    a = [transform(tok, CODE, document_rng(5, i)) for i in range(20)]
    b = [transform(tok, CODE, document_rng(5, i)) for i in range(20)]
    c = [transform(tok, CODE, document_rng(6, i)) for i in range(20)]
    assert a == b
    assert a != c


def test_segments_join_back_and_fit():
    text = "".join(f"line {i} " + "y" * (i % 17) + "\n" for i in range(200)) + "z" * 500
    pieces = segment_text(text, 120)
    assert "".join(pieces) == text
    assert all(len(p) <= 120 or "\n" not in p[:-1] for p in pieces)
    assert all(p.endswith("\n") for p in pieces[:-1])
    assert segment_text("short", 0) == ["short"]


def test_token_stream_counts(tok, tmp_path):
    docs = [Document(f"d{i}.py", CODE * (1 + i % 3)) for i in range(40)]
    counts = tokenize_documents(tok, docs, tmp_path / "t.bin", fim=FIMConfig(), doc_chars=0, passes=2, seed=1)
    assert counts["documents"] == 80
    assert counts["psm"] + counts["spm"] + counts["plain"] == 80
    assert (tmp_path / "t.bin").stat().st_size == 2 * counts["tokens"]  # uint16 for a 512-piece vocabulary
    again = tokenize_documents(tok, docs, tmp_path / "u.bin", fim=FIMConfig(), doc_chars=0, passes=2, seed=1)
    assert again == counts
    assert (tmp_path / "t.bin").read_bytes() == (tmp_path / "u.bin").read_bytes()
