"""The shipped instruction data (``codellama.instruct_data``) and ``codellama eval instruct-format``.

Data: the files load and validate, only MBPP *train* rows (601-974) are in, every dialog renders through both
chat layouts, every ``[PYTHON]`` block parses and every shipped test passes in the sandbox. Metric: exact
rates on a scripted model, sane ones on a tiny random model, and the CLI end to end on a tiny checkpoint."""

from __future__ import annotations

import ast
import json
import warnings
from pathlib import Path

import pytest
import torch

from codellama import instruct_data
from codellama.api import CodeLlama
from codellama.checkpoint import save_checkpoint
from codellama.cli import main
from codellama.config import ModelConfig
from codellama.errors import CodeLlamaError
from codellama.evaluation import instruct_format
from codellama.evaluation.execution import Limits, run_programs
from codellama.evaluation.mbpp import TEST_IDS, task_prompt
from codellama.formats import inst_chat_tokens, step_chat_tokens
from codellama.generation import Completion
from codellama.model import Transformer
from codellama.tokenizer import Tokenizer

SHARED_MBPP = Path(__file__).resolve().parents[2] / "shared" / "data" / "mbpp" / "mbpp.jsonl"


@pytest.fixture(scope="module")
def all_rows() -> dict[str, list[dict]]:
    return {name: instruct_data.read(name) for name in instruct_data.files()}


# ---- the data ----------------------------------------------------------------------------------------------
def test_files_load_with_the_schema(all_rows):
    assert instruct_data.files() == ["handwritten.jsonl", "mbpp_train.jsonl"]
    assert len(all_rows["mbpp_train.jsonl"]) == 373
    hand = all_rows["handwritten.jsonl"]
    assert len(hand) >= 120
    assert len(instruct_data.dialogs()) == sum(len(v) for v in all_rows.values())
    assert instruct_data.path("instruct:mbpp_train") == instruct_data.path("mbpp_train.jsonl")  # recipe names
    for rows in all_rows.values():
        for r in rows:
            assert set(r) >= {"messages", "source", "licence"}
            assert all(set(m) == {"role", "content"} for m in r["messages"])
    assert {r["licence"] for r in all_rows["mbpp_train.jsonl"]} == {"CC-BY-4.0"}
    assert {r["source"] for r in hand} == {"codellama-handwritten"}
    # the variety the brief asks for
    assert sum(r["messages"][0]["role"] == "system" for r in hand) >= 10
    assert sum(sum(m["role"] == "user" for m in r["messages"]) > 1 for r in hand) >= 5
    kinds = {r["kind"] for r in hand}
    assert kinds >= {"function", "class", "fix", "docstring", "explain", "two-turn"}
    for name in ("ATTRIBUTION.md", "README.md"):
        assert (instruct_data.data_dir() / name).is_file()


def test_loader_refuses_bad_rows():
    with pytest.raises(CodeLlamaError, match="no instruction data file"):
        instruct_data.read("../../etc/passwd")
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "source": "s", "licence": "MIT"}
    instruct_data.check_dialog(good)
    for bad in ({**good, "licence": ""},
                {**good, "messages": good["messages"][:1]},
                {**good, "messages": good["messages"][::-1]},
                {**good, "messages": good["messages"] + [{"role": "user", "content": "more"}]},
                {**good, "tests": "assert True"}):
        with pytest.raises(CodeLlamaError):
            instruct_data.check_dialog(bad)


def test_mbpp_rows_are_the_train_split_only(all_rows):
    rows = all_rows["mbpp_train.jsonl"]
    ids = [r["task_id"] for r in rows]
    assert len(set(ids)) == len(ids)
    assert all(i in instruct_data.MBPP_TRAIN_IDS for i in ids)
    assert not set(ids) & set(TEST_IDS)
    assert sorted(set(instruct_data.MBPP_TRAIN_IDS) - set(ids)) == [642]  # fails its own tests upstream
    for r in rows:
        user, answer = r["messages"]
        assert user["content"].endswith("\n" + instruct_data.PYTHON_INSTRUCTION)
        assert all(t in user["content"] for t in r["tests"])  # the tests are in the prompt, as in MBPP chat mode
        assert answer["content"].startswith("[PYTHON]\n") and answer["content"].endswith("\n[/PYTHON]")


def test_mbpp_rows_match_the_source_file(all_rows):
    if not SHARED_MBPP.is_file():
        pytest.skip("../shared/data/mbpp/mbpp.jsonl not present")
    from codellama.evaluation.mbpp import load_mbpp
    src = load_mbpp(SHARED_MBPP)
    for r in all_rows["mbpp_train.jsonl"]:
        row = src[r["task_id"]]
        assert r["messages"][0]["content"] == instruct_data.mbpp_user_message(row)
        assert r["tests"] == row["test_list"]
        code = instruct_data.python_blocks(r["messages"][1]["content"])[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            assert ast.dump(ast.parse(code)) == ast.dump(ast.parse(row["code"]))  # reformatted, same program
    # no handwritten question is an MBPP evaluation task
    test_texts = {src[i]["text"].strip().lower() for i in TEST_IDS}
    for r in all_rows["handwritten.jsonl"]:
        for m in r["messages"]:
            assert m["content"].strip().lower() not in test_texts


@pytest.mark.parametrize("layout", ["inst", "step"])
def test_every_dialog_renders(all_rows, layout, tiny_tokenizer_path, tiny_step_tokenizer_path):
    tok = Tokenizer(tiny_tokenizer_path if layout == "inst" else tiny_step_tokenizer_path)
    render = inst_chat_tokens if layout == "inst" else step_chat_tokens
    n = 0
    for rows in all_rows.values():
        for r in rows:
            msgs = r["messages"]
            for i, m in enumerate(msgs):
                if m["role"] == "assistant":  # the prompt of every reply the model is trained on
                    assert render(tok, msgs[:i])
            # and the whole dialog, answers included (formats refuses special tags anywhere)
            full = render(tok, msgs + [{"role": "user", "content": "next"}])
            assert full[0] == tok.bos_id
            n += 1
    assert n == len(instruct_data.dialogs())


def test_every_code_block_parses(all_rows):
    blocks = 0
    for name, rows in all_rows.items():
        for r in rows:
            for m in r["messages"]:
                if m["role"] != "assistant":
                    continue
                found = instruct_data.python_blocks(m["content"])
                if name == "mbpp_train.jsonl" or r.get("kind") != "explain":
                    assert len(found) == 1, (name, r["messages"][0]["content"][:60])
                for b in found:
                    with warnings.catch_warnings():  # some MBPP code has invalid escapes like '\\d'
                        warnings.simplefilter("ignore", SyntaxWarning)
                        warnings.simplefilter("ignore", DeprecationWarning)
                        ast.parse(b)
                    blocks += 1
                assert m["content"].count("[PYTHON]") == len(found) == m["content"].count("[/PYTHON]")
    assert blocks >= 373 + 115


def test_shipped_tests_pass_in_the_sandbox(all_rows):
    programs = []
    for rows in all_rows.values():
        programs += [p for p in map(instruct_data.program_with_tests, rows) if p is not None]
    assert len(programs) >= 373 + 100
    results = run_programs(programs, Limits(timeout=15.0), workers=2)
    failed = [(programs[i][:80], r.status, r.message) for i, r in enumerate(results) if not r.passed]
    assert not failed


def test_program_with_tests_uses_the_last_block():
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "[PYTHON]\nx = 1\n[/PYTHON]"},
                        {"role": "user", "content": "b"}, {"role": "assistant", "content": "[PYTHON]\nx = 2\n[/PYTHON]"}],
           "source": "s", "licence": "MIT", "tests": ["assert x == 2"]}
    assert instruct_data.program_with_tests(row) == "x = 2\nassert x == 2\n"
    assert instruct_data.program_with_tests({**row, "tests": []}) is None
    assert instruct_data.python_blocks("[PYTHON]\nopen(") == []


# ---- the metric --------------------------------------------------------------------------------------------
def _mbpp_file(tmp_path: Path, ids=range(1, 521)) -> Path:
    p = tmp_path / "mbpp.jsonl"
    with open(p, "w") as f:
        for i in ids:
            f.write(json.dumps({"text": f"Write a function to add {i}.", "code": f"def add_{i}(x):\r\n    return x + {i}",
                                "task_id": i, "test_setup_code": "", "test_list": [f"assert add_{i}(1) == {1 + i}"],
                                "challenge_test_list": []}) + "\n")
    return p


def test_held_out_prompts_are_mbpp_test_in_the_training_words(tmp_path):
    prompts = instruct_format.held_out_prompts(_mbpp_file(tmp_path))
    assert [p["task_id"] for p in prompts] == [f"MBPP/{i}" for i in range(11, 111)]
    row = {"text": "Write a function to add 11.", "test_list": ["assert add_11(1) == 12"]}
    assert prompts[0]["messages"] == [{"role": "user", "content": task_prompt(row) + "\n"
                                       + instruct_data.PYTHON_INSTRUCTION}]
    assert len(instruct_format.held_out_prompts(_mbpp_file(tmp_path), limit=7)) == 7
    with pytest.raises(CodeLlamaError):
        instruct_format.held_out_prompts(_mbpp_file(tmp_path), limit=0)


def _llama(tokenizer_path, max_seq_len=256) -> CodeLlama:
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32,
                         rope_theta=1_000_000.0, max_seq_len=max_seq_len, name="tiny-random")
    torch.manual_seed(0)
    model = Transformer(config)
    model.init_weights()
    return CodeLlama(model.eval(), Tokenizer(tokenizer_path))


SCRIPT = [  # (reply, finish_reason, eos?, has block?, parses?)
    ("[PYTHON]\ndef f(x):\n    return x\n[/PYTHON]", "stop", True, True, True),
    ("[PYTHON]\ndef f(x:\n[/PYTHON]", "stop", True, True, False),
    ("Sure. [PYTHON]\nx = 1\n[/PYTHON] and more [PYTHON]\n(\n[/PYTHON]", "length", False, True, True),
    ("[PYTHON]\ndef f(x):\n    return", "length", False, False, False),
    ("no code at all", "stop", True, False, False),
]


def test_report_on_a_scripted_model_is_exact(tiny_tokenizer_path, monkeypatch):
    llama = _llama(tiny_tokenizer_path)
    calls = []

    def fake_chat(dialogs, **kw):
        calls.append((dialogs, kw))
        out = []
        for d in dialogs:
            k = int(d[-1]["content"].split()[-1])
            text, reason = SCRIPT[k][:2]
            out.append(Completion(text=text, tokens=list(range(len(text))), logprobs=None, finish_reason=reason,
                                  prompt_tokens=3))
        return out

    monkeypatch.setattr(llama, "chat", fake_chat)
    prompts = [f"question {k}" for k in range(len(SCRIPT))] + [{"task_id": "long", "messages": [
        {"role": "user", "content": "word " * 400}]}]  # no room in a 256-token context
    rep = instruct_format.instruct_format_report(llama, prompts, max_new_tokens=32, batch_size=2)
    n = len(SCRIPT) + 1
    assert rep["n"] == n and rep["prompts_over_context"] == 1
    assert rep["eos_rate"] == sum(s[2] for s in SCRIPT) / n == 3 / 6
    assert rep["block_rate"] == sum(s[3] for s in SCRIPT) / n == 3 / 6
    assert rep["parse_rate"] == sum(s[4] for s in SCRIPT) / n == 2 / 6
    assert rep["mean_reply_tokens"] == sum(len(s[0]) for s in SCRIPT) / n
    assert [r["parses"] for r in rep["replies"]] == [s[4] for s in SCRIPT] + [False]
    assert rep["replies"][-1]["finish_reason"] == "over_context" and rep["replies"][-1]["task_id"] == "long"
    # greedy, with the budget, in batches of 2, the over-long prompt never sent
    assert [len(d) for d, _ in calls] == [2, 2, 1]
    assert all(kw["temperature"] == 0.0 and kw["max_new_tokens"] == 32 for _, kw in calls)
    with pytest.raises(CodeLlamaError):
        instruct_format.instruct_format_report(llama, [], 8)
    with pytest.raises(CodeLlamaError):
        instruct_format.instruct_format_report(llama, ["q"], 0)


def test_report_on_a_tiny_random_model_is_sane(tiny_tokenizer_path):
    llama = _llama(tiny_tokenizer_path)
    prompts = [r["messages"][:-1] for r in instruct_data.read("handwritten.jsonl")[:6]]
    budget = 12
    rep = instruct_format.instruct_format_report(llama, prompts, max_new_tokens=budget, batch_size=4)
    assert rep["n"] == 6 and rep["prompts_over_context"] == 0
    for k in ("eos_rate", "parse_rate", "block_rate"):
        assert 0.0 <= rep[k] <= 1.0
    assert rep["parse_rate"] <= rep["block_rate"]
    replies = rep["replies"]
    assert rep["eos_rate"] == sum(r["finish_reason"] == "stop" for r in replies) / 6
    assert all(r["finish_reason"] in ("stop", "length") for r in replies)
    assert all(r["tokens"] < budget for r in replies if r["eos"])
    assert all(r["tokens"] == budget for r in replies if not r["eos"])
    assert 0 <= rep["mean_reply_tokens"] <= budget
    assert rep["mean_reply_tokens"] == sum(r["tokens"] for r in replies) / 6
    # greedy: the same numbers again, whatever the batch size
    again = instruct_format.instruct_format_report(llama, prompts, max_new_tokens=budget, batch_size=1)
    assert [r["reply"] for r in again["replies"]] == [r["reply"] for r in replies]


def test_cli_instruct_format_end_to_end(tiny_tokenizer_path, tmp_path, capsys):
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32,
                         rope_theta=1_000_000.0, max_seq_len=1024, name="tiny-random")
    torch.manual_seed(0)
    model = Transformer(config)
    model.init_weights()
    ckpt = save_checkpoint(model.eval(), tmp_path / "ckpt", tokenizer=tiny_tokenizer_path)
    out = tmp_path / "if.json"
    code = main(["eval", "instruct-format", "--model", str(ckpt), "--data", str(_mbpp_file(tmp_path)),
                 "--limit", "3", "--max-new-tokens", "8", "--no-progress", "--output", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0
    res = json.loads(out.read_text())
    assert res["benchmark"] == "instruct-format" and res["model"] == "ckpt"
    assert res["metrics"]["n"] == 3 and res["settings"]["max_new_tokens"] == 8 and res["settings"]["limit"] == 3
    assert [p["task_id"] for p in res["problems"]] == ["MBPP/11", "MBPP/12", "MBPP/13"]
    assert "eos_rate" in stdout and "parse_rate" in stdout
    code = main(["eval", "compare", str(out)])
    assert code == 0 and "instruct-format" in capsys.readouterr().out
