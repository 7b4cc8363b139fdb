"""Tokenizer: ids equal sentencepiece's (and llama.cpp's published vectors on the real vocabulary), the FIM and
chat special ids, and infilling encode/decode that keeps leading spaces for any vocabulary."""

from __future__ import annotations

import pytest
import sentencepiece as spm

from codellama.errors import CodeLlamaError
from codellama.tokenizer import Tokenizer

TEXTS = [
    "", " ", "  ", "\n", "Hello world", " Hello World!", "def f(x):\n    return x + 1\n",
    "    return x", "\tif a >= 10_000:\n\t\tpass", "# 注释 émoji 😀 ünïcödé", "x = [1, 2, 3]  # trailing  ",
    "class A:\n\n    def __init__(self):\n        self.a = {'k': \"v\"}\n",
]
INFILL_TEXTS = ["    return x", " x", "  two", "\n    y = 1\n", "no_space", "\t\tz", " ", "😀 ok", ""]

# llama.cpp's tokenizer test vectors for the Llama vocabulary (test-tokenizer-0-llama), which the shared model
# was rebuilt to reproduce.
LLAMA_CPP_VECTORS = {
    "": [], " ": [259], "  ": [1678], "   ": [268], "\t": [29871, 12], "\n": [29871, 13],
    "Hello world": [15043, 3186], " Hello world": [29871, 15043, 3186], "Hello World": [15043, 2787],
    " Hello World!": [29871, 15043, 2787, 29991], "Hello, world!": [15043, 29892, 3186, 29991],
    " this is 🦙.cpp": [29871, 445, 338, 29871, 243, 162, 169, 156, 29889, 8223],
}


def _check_common(tok: Tokenizer, path) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(path))
    assert tok.n_words == sp.vocab_size() and (tok.bos_id, tok.eos_id) == (1, 2)
    for text in TEXTS:
        assert tok.encode(text) == sp.encode(text)
        assert tok.encode(text, bos=True, eos=True) == [1] + sp.encode(text) + [2]
        assert tok.decode(tok.encode(text, bos=True, eos=True)) == sp.decode(sp.encode(text))
    for text in INFILL_TEXTS:
        ids = tok.encode_infilling(text)
        assert tok.decode_infilling(ids) == text, text
        # Exactly the text's own spaces: no dummy-prefix "▁" piece in front.
        assert "".join(tok.id_to_piece(i) for i in ids).replace("▁", " ") == text or any(
            tok.id_to_piece(i).startswith("<0x") for i in ids)
    assert tok.stop_ids[0] == tok.eos_id


def test_real_vocabulary(real_tokenizer_path):
    tok = Tokenizer(real_tokenizer_path)
    _check_common(tok, real_tokenizer_path)
    assert tok.n_words == 32016
    assert (tok.prefix_id, tok.suffix_id, tok.middle_id, tok.eot_id) == (32007, 32008, 32009, 32010)
    assert tok.supports_infilling and tok.step_id is None and tok.stop_ids == [2, 32010]
    for text, ids in LLAMA_CPP_VECTORS.items():
        assert tok.encode(text) == ids, text
    # Four spaces stay four: 3-space piece + "▁return" (which carries the fourth), not the 4-space piece.
    assert tok.encode_infilling("    return x") == [1678, 736, 921]
    assert tok.encode("    return x") == [268, 736, 921]  # the normal path adds the implicit space
    assert tok.decode_infilling([1678, 736, 921]) == "    return x"
    assert tok.decode([1678, 736, 921]) == "   return x"  # why decode_infilling exists
    # Meta's reference encodes infilling text as encode("☺" + s)[2:], which works on this vocabulary only
    # because "☺" is one piece; ours must agree with it here.
    sp = spm.SentencePieceProcessor(model_file=str(real_tokenizer_path))
    for text in INFILL_TEXTS[:-1]:
        assert tok.encode_infilling(text) == sp.encode("☺" + text)[2:], text


def test_trained_vocabulary(tiny_tokenizer_path):
    tok = Tokenizer(tiny_tokenizer_path)
    _check_common(tok, tiny_tokenizer_path)
    assert tok.supports_infilling and tok.step_id is None
    assert [tok.id_to_piece(i) for i in (tok.prefix_id, tok.suffix_id, tok.middle_id, tok.eot_id)] == [
        "▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"]
    # "☺" is not a single piece here, so Meta's sentinel trick would corrupt the text; ours does not rely on it.
    assert len(tok.encode("☺")) > 2
    assert tok.decode_infilling(tok.encode_infilling("    return x")) == "    return x"


def test_step_and_no_fim_vocabularies(tiny_step_tokenizer_path, tiny_nofim_tokenizer_path):
    step = Tokenizer(tiny_step_tokenizer_path)
    assert step.step_id is not None and step.id_to_piece(step.step_id) == "<step>"
    assert step.stop_ids == [2, step.eot_id, step.step_id]
    nofim = Tokenizer(tiny_nofim_tokenizer_path)
    assert (nofim.prefix_id, nofim.suffix_id, nofim.middle_id, nofim.eot_id, nofim.step_id) == (None,) * 5
    assert not nofim.supports_infilling and nofim.stop_ids == [2]
    # Encoding without the dummy prefix works without FIM pieces too.
    assert nofim.decode_infilling(nofim.encode_infilling("    return x")) == "    return x"


def test_from_bytes_and_errors(tmp_path, tiny_tokenizer_path):
    tok = Tokenizer(tiny_tokenizer_path.read_bytes())
    assert tok.path is None and tok.n_words == 512 and len(tok) == 512
    with pytest.raises(CodeLlamaError, match="tokenizer model not found: .*nope.model"):
        Tokenizer(tmp_path / "nope.model")
    (tmp_path / "bad.model").write_bytes(b"\x00garbage")
    with pytest.raises(CodeLlamaError, match=r"not a SentencePiece model \(.*bad.model\)"):
        Tokenizer(tmp_path / "bad.model")
