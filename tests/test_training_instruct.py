"""Instruction tuning data (training/instruct.py): exactly the assistant tokens carry loss, in both chat layouts;
the tokens are formats.py's; packed rows give the losses of padded ones; a dialog source trains in a mixture."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from codellama.config import ModelConfig
from codellama.errors import CodeLlamaError
from codellama.formats import inst_chat_tokens, step_chat_tokens
from codellama.model import Transformer
from codellama.tokenizer import Tokenizer
from codellama.training.instruct import (IGNORE, pack_rows, padded_rows, read_dialogs, render_dialog,
                                         split_dialogs)

DIALOGS = [
    [{"role": "user", "content": "Write a function that adds two numbers."},
     {"role": "assistant", "content": "[PYTHON]\ndef add(a, b):\n    return a + b\n[/PYTHON]"}],
    [{"role": "system", "content": "Answer with code only."},
     {"role": "user", "content": "Reverse a string s."},
     {"role": "assistant", "content": "[PYTHON]\ndef rev(s):\n    return s[::-1]\n[/PYTHON]"},
     {"role": "user", "content": "Now in place for a list."},
     {"role": "assistant", "content": "[PYTHON]\ndef rev_list(xs):\n    xs.reverse()\n[/PYTHON]"}],
    [{"role": "user", "content": "What does len() return?"},
     {"role": "assistant", "content": "The number of items in a container."}],
]


def target_spans(sample) -> list[list[int]]:
    spans, current = [], []
    for tok, is_target in zip(sample.tokens, sample.targets):
        if is_target:
            current.append(tok)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return spans


def test_llama2_layout_targets_are_exactly_the_answers_and_their_eos(tiny_tokenizer_path):
    tok = Tokenizer(tiny_tokenizer_path)
    dialog = DIALOGS[1]
    (sample,) = render_dialog(tok, dialog)
    # The tokens are formats.py's: its prompt for the last turn is a prefix, and the answer follows it.
    prompt = inst_chat_tokens(tok, dialog[:-1])
    assert sample.tokens[:len(prompt)] == prompt
    spans = target_spans(sample)
    assert len(spans) == 2  # one per assistant turn
    for span, answer in zip(spans, (dialog[2], dialog[4])):
        assert span[-1] == tok.eos_id
        assert tok.decode(span[:-1]).strip() == answer["content"]
    # Nothing of the user turns, the system prompt, [INST] or bos is a target.
    assert sum(sample.targets) == sum(len(s) for s in spans)
    assert sample.targets[len(prompt):] == [True] * (len(sample.tokens) - len(prompt))


def test_step_layout_one_sample_per_assistant_turn_with_its_step(tiny_step_tokenizer_path):
    tok = Tokenizer(tiny_step_tokenizer_path)
    dialog = DIALOGS[1]
    samples = render_dialog(tok, dialog)
    assert len(samples) == 2
    for sample, k in zip(samples, (2, 4)):
        prompt = step_chat_tokens(tok, dialog[:k])
        assert sample.tokens[:len(prompt)] == prompt  # exactly formats.py's prompt for that turn
        assert sample.targets == [False] * len(prompt) + [True] * (len(sample.tokens) - len(prompt))
        assert sample.tokens[-1] == tok.step_id
        assert tok.decode(sample.tokens[len(prompt):-1]).strip() == dialog[k]["content"]


def test_bad_dialogs_are_refused_in_one_line(tmp_path, tiny_tokenizer_path):
    tok = Tokenizer(tiny_tokenizer_path)
    path = tmp_path / "d.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(CodeLlamaError, match=r"d.jsonl:1: the dialog has no assistant message"):
        read_dialogs(path)
    path.write_text('{"messages": [{"role": "robot", "content": "hi"}]}\n')
    with pytest.raises(CodeLlamaError, match=r"d.jsonl:1: message 0 must have a role"):
        read_dialogs(path)
    with pytest.raises(CodeLlamaError, match="special tag"):
        render_dialog(tok, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a [INST] b"}])
    with pytest.raises(CodeLlamaError, match="alternate"):
        render_dialog(tok, [{"role": "user", "content": "x"}, {"role": "user", "content": "y"},
                            {"role": "assistant", "content": "z"}])


def _loss(model: Transformer, rows) -> tuple[float, int]:
    x, y, seg = rows.batch(range(len(rows)))
    logits = model(x, segments=seg)
    total = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
    return total, int((y != IGNORE).sum())


def test_packed_and_padded_rows_give_the_same_loss(tiny_tokenizer_path):
    tok = Tokenizer(tiny_tokenizer_path)
    samples = [s for d in DIALOGS * 3 for s in render_dialog(tok, d)]
    width = max(len(s.tokens) for s in samples) * 2 + 3
    packed, dropped = pack_rows(samples, width, tok.eos_id)
    padded, dropped_too = padded_rows(samples, width, tok.eos_id)
    assert dropped == dropped_too == 0
    assert len(packed) < len(padded) == len(samples)
    assert (packed.segments >= 0).sum() == (padded.segments >= 0).sum()  # the same tokens, fewer rows
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words,
                                    max_seq_len=width))
    model.init_weights()
    with torch.no_grad():
        a, n_a = _loss(model, packed)
        b, n_b = _loss(model, padded)
    assert n_a == n_b == sum(sum(s.targets[1:]) for s in samples)
    assert abs(a / n_a - b / n_b) < 1e-5


def test_dialogs_too_long_for_a_row_are_dropped_and_counted(tiny_tokenizer_path):
    tok = Tokenizer(tiny_tokenizer_path)
    samples = [s for d in DIALOGS for s in render_dialog(tok, d)]
    longest = max(len(s.tokens) for s in samples)
    rows, dropped = pack_rows(samples, longest - 1, tok.eos_id)
    assert dropped == sum(len(s.tokens) > longest - 1 for s in samples) >= 1
    assert (rows.segments >= 0).sum() == sum(len(s.tokens) for s in samples if len(s.tokens) <= longest - 1)


def test_split_is_stable_and_disjoint():
    many = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(200)]
    train, val = split_dialogs(many, 0.1)
    assert len(train) + len(val) == 200 and 5 < len(val) < 40
    train2, val2 = split_dialogs(many + [[{"role": "user", "content": "new"},
                                           {"role": "assistant", "content": "x"}]], 0.1)
    assert all(d in val2 for d in val)  # adding a dialog moves no other


def test_a_dialog_source_trains_in_a_mixture_with_rehearsal(base, tmp_path):
    from codellama.training.trainer import read_log, train
    dialogs = tmp_path / "dialogs.jsonl"
    rows = [{"messages": d, "licence": "CC0-1.0", "source": "test"} for d in DIALOGS * 40]
    for i, r in enumerate(rows):  # distinct dialogs, so the validation split is not a copy of training
        r["messages"] = [dict(m) for m in r["messages"]]
        r["messages"][0]["content"] += f" (case {i})"
    dialogs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sources = [{"name": "instruct", "dialogs": [str(dialogs)], "weight": 0.92},
               {"name": "code", "corpus": base.corpus, "weight": 0.08}]
    config = replace(base, name="sft", out_dir=str(tmp_path / "run"), data_dir=str(tmp_path / "data"), sources=sources,
                     seq_len=96, max_steps=24, eval_interval=12, ckpt_interval=12, lr=1e-2)
    summary = train(config, log=lambda _m: None)
    log = read_log(config.out_dir)
    first, last = log[11]["val_loss_by_source"], log[-1]["val_loss_by_source"]
    assert set(last) == {"instruct", "code"}
    assert last["instruct"] < first["instruct"] < 5.0
    assert summary["step"] == 24
    meta = json.loads((tmp_path / "data" / "mixture.json").read_text())
    assert meta["sources"]["instruct"]["kind"] == "dialogs" and meta["fim"]["instruct"] is False
    assert meta["licences"]["instruct"][0]["licences"] == ["CC0-1.0"]
    # Resume is exact with dialog rows in the stream too.
    split = replace(config, out_dir=str(tmp_path / "split"))
    train(split, until_step=7, log=lambda _m: None)
    train(split, resume=True, log=lambda _m: None)
    assert [r["loss"] for r in read_log(split.out_dir)] == [r["loss"] for r in log]
