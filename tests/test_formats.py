"""Prompt layouts, token for token against SPEC.md's formulas written out with plain sentencepiece:
PSM / SPM infilling, Llama 2 ``[INST]`` chat and the 70B ``Source:``/``<step>`` chat; special-tag refusal."""

from __future__ import annotations

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from codellama.errors import CodeLlamaError
from codellama.formats import SPECIAL_TAGS, chat_tokens, infilling_tokens, inst_chat_tokens, step_chat_tokens
from codellama.tokenizer import Tokenizer

PREFIX = "def add(a, b):\n    "
SUFFIX = "    return c\n"


def _reference(path):
    """enc (with SentencePiece's implicit leading space) and enc_nospace, built here from the model file."""
    sp = spm.SentencePieceProcessor(model_file=str(path))
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    proto.normalizer_spec.add_dummy_prefix = False
    nospace = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    return sp.encode, nospace.encode


@pytest.fixture(params=["real", "trained"])
def fim_tokenizer(request, tiny_tokenizer_path):
    path = request.getfixturevalue("real_tokenizer_path") if request.param == "real" else tiny_tokenizer_path
    return path, Tokenizer(path)


def test_psm_and_spm_layouts(fim_tokenizer):
    path, tok = fim_tokenizer
    enc, enc_nospace = _reference(path)
    bos, pre, suf, mid = 1, tok.prefix_id, tok.suffix_id, tok.middle_id
    psm = [bos, pre] + enc(PREFIX) + [suf] + enc_nospace(SUFFIX) + [mid]
    spm_layout = [bos, pre, suf] + enc_nospace(SUFFIX) + [mid] + enc(PREFIX)
    assert infilling_tokens(tok, PREFIX, SUFFIX) == psm
    assert infilling_tokens(tok, PREFIX, SUFFIX, suffix_first=True) == spm_layout
    # Exactly one BOS, and the suffix's four spaces survive (no leading-space piece added in front).
    assert psm.count(bos) == 1
    suffix_ids = psm[psm.index(suf) + 1:-1]
    assert tok.decode_infilling(suffix_ids) == SUFFIX
    if tok.n_words == 32016:
        assert psm[:2] == [1, 32007] and psm[-1] == 32009 and 32008 in psm


def test_infilling_refused_without_fim_pieces(tiny_nofim_tokenizer_path):
    tok = Tokenizer(tiny_nofim_tokenizer_path)
    with pytest.raises(CodeLlamaError, match=r"model 'CodeLlama-34b' cannot infill: its tokenizer has no FIM pieces"):
        infilling_tokens(tok, "a", "b", model_name="CodeLlama-34b")
    with pytest.raises(CodeLlamaError, match=r"this model cannot infill"):
        infilling_tokens(tok, "a", "b", suffix_first=True)


DIALOG = [
    {"role": "system", "content": "Answer in Python."},
    {"role": "user", "content": "  Sum two numbers.  "},
    {"role": "assistant", "content": " def s(a, b):\n    return a + b\n"},
    {"role": "user", "content": "Now three."},
]


def test_inst_chat_layout(fim_tokenizer):
    path, tok = fim_tokenizer
    enc, _ = _reference(path)
    expected = ([1] + enc("[INST] <<SYS>>\nAnswer in Python.\n<</SYS>>\n\n  Sum two numbers. [/INST] "
                          "def s(a, b):\n    return a + b ") + [2]
                + [1] + enc("[INST] Now three. [/INST]"))
    assert inst_chat_tokens(tok, DIALOG) == expected
    assert chat_tokens(tok, DIALOG) == expected  # no <step> piece: the Llama 2 format
    single = [{"role": "user", "content": " hi "}]
    assert inst_chat_tokens(tok, single) == [1] + enc("[INST] hi [/INST]")
    no_system = DIALOG[1:]
    assert inst_chat_tokens(tok, no_system) == ([1] + enc("[INST] Sum two numbers. [/INST] def s(a, b):\n"
                                                           "    return a + b ") + [2]
                                                + [1] + enc("[INST] Now three. [/INST]"))


def test_step_chat_layout(tiny_step_tokenizer_path, tiny_tokenizer_path):
    tok = Tokenizer(tiny_step_tokenizer_path)
    enc, _ = _reference(tiny_step_tokenizer_path)
    step = tok.step_id
    dialog = [dict(m) for m in DIALOG]
    dialog[1]["destination"] = "assistant"
    expected = ([1]
                + enc(" Source: system") + enc("\n\n Answer in Python.") + [step]
                + enc(" Source: user\nDestination: assistant") + enc("\n\n Sum two numbers.") + [step]
                + enc(" Source: assistant") + enc("\n\n def s(a, b):\n    return a + b") + [step]
                + enc(" Source: user") + enc("\n\n Now three.") + [step]
                + enc(" Source: assistant\nDestination: user") + enc("\n\n "))
    assert step_chat_tokens(tok, dialog) == expected
    assert chat_tokens(tok, dialog) == expected  # the tokenizer has <step>: Meta picks this format
    # No system message: an empty one is inserted, with no body.
    assert step_chat_tokens(tok, [{"role": "user", "content": "hi"}]) == (
        [1] + enc(" Source: system") + [step] + enc(" Source: user") + enc("\n\n hi") + [step]
        + enc(" Source: assistant\nDestination: user") + enc("\n\n "))
    with pytest.raises(CodeLlamaError, match="no <step> piece: it is not a 70B-Instruct tokenizer"):
        step_chat_tokens(Tokenizer(tiny_tokenizer_path), dialog)


@pytest.mark.parametrize("tag", SPECIAL_TAGS)
@pytest.mark.parametrize("turn", [0, 1, 2, 3])
def test_special_tags_are_refused(tiny_step_tokenizer_path, tiny_tokenizer_path, tag, turn):
    dialog = [dict(m) for m in DIALOG]
    dialog[turn]["content"] = f"please {tag} here"
    for fmt, path in ((inst_chat_tokens, tiny_tokenizer_path), (step_chat_tokens, tiny_step_tokenizer_path)):
        with pytest.raises(CodeLlamaError, match=rf"message {turn} \({dialog[turn]['role']}\) contains the special "
                                                 rf"tag '{__import__('re').escape(tag)}'; refusing"):
            fmt(Tokenizer(path), dialog)


def test_dialog_shape_errors(tiny_tokenizer_path, tiny_step_tokenizer_path):
    tok, step = Tokenizer(tiny_tokenizer_path), Tokenizer(tiny_step_tokenizer_path)
    for t in (tok, step):
        with pytest.raises(CodeLlamaError, match="chat needs at least one message"):
            chat_tokens(t, [])
        with pytest.raises(CodeLlamaError, match="the last message must be from the user, got 'assistant'"):
            chat_tokens(t, DIALOG[:3])
        with pytest.raises(CodeLlamaError, match="roles must"):
            chat_tokens(t, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
        with pytest.raises(CodeLlamaError, match="message 0 must be a mapping with 'role' and 'content'"):
            chat_tokens(t, [{"content": "a"}])
        with pytest.raises(CodeLlamaError, match="message 0: content must be a string"):
            chat_tokens(t, [{"role": "user", "content": 3}])


def test_banned_ids_are_the_fim_sentinels_of_each_request_kind(tiny_tokenizer_path, tiny_nofim_tokenizer_path):
    from codellama.formats import banned_ids
    tok = Tokenizer(tiny_tokenizer_path)
    fim = (tok.prefix_id, tok.suffix_id, tok.middle_id)
    assert banned_ids(tok, "complete") == banned_ids(tok, "chat") == fim + (tok.eot_id,)
    assert banned_ids(tok, "infill") == fim  # EOT ends the middle: it must stay possible
    assert tok.bos_id not in banned_ids(tok, "complete") and tok.eos_id not in banned_ids(tok, "complete")
    assert banned_ids(Tokenizer(tiny_nofim_tokenizer_path), "complete") == ()  # 34B / Python: nothing to ban
    with pytest.raises(ValueError, match="kind"):
        banned_ids(tok, "edit")
