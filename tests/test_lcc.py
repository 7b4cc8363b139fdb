import random
from pathlib import Path

import pytest

from codellama.errors import CodeLlamaError
from codellama.evaluation import lcc
from codellama.evaluation.metrics import (METRIC_DEFINITIONS, bleu, edit_similarity_lcc, exact_match_codexglue,
                                          indel_ratio)

# (pred, gt, exact_match_codexglue, indel_ratio) -- indel_ratio = 200 * LCS / (len(a) + len(b)), by hand.
TABLE = [
    ("", "", True, 100.0),
    ("a", "", False, 0.0),
    ("", "a", False, 0.0),
    ("abc", "abc", True, 100.0),
    ("kitten", "sitting", False, 800 / 13),
    ("a b", "a  b", True, 600 / 7),
    (" x = 1\n", "x = 1", True, 1000 / 12),
    ("abc", "xyz", False, 0.0),
    ("ab", "ba", False, 50.0),
    ("é", "e", False, 0.0),
    ("héllo", "hello", False, 80.0),
    ("return x", "return  x", True, 1600 / 17),
    ("foo(bar)", "foo(baz)", False, 87.5),
    ("\t", "  ", True, 0.0),
    ("aaaa", "aa", False, 400 / 6),
    ("x", "x ", True, 200 / 3),
    ("日本語", "日本", False, 80.0),
    ("abcd", "acbd", False, 75.0),
    ("if x:", "if x :", False, 1000 / 11),
    ("a\nb", "a b", True, 400 / 6),
    ("🙂x", "x", False, 200 / 3),
]


@pytest.mark.parametrize("pred,gt,em,ratio", TABLE)
def test_table(pred, gt, em, ratio):
    assert exact_match_codexglue(pred, gt) is em
    assert indel_ratio(pred, gt) == pytest.approx(ratio, abs=1e-9)
    assert indel_ratio(gt, pred) == pytest.approx(ratio, abs=1e-9)


def test_edit_similarity_lcc_strips():
    assert edit_similarity_lcc("  x = 1\n", "x = 1") == 100.0
    assert set(METRIC_DEFINITIONS) >= {"exact_match_codexglue", "indel_ratio", "edit_similarity_lcc", "bleu"}


def test_matches_rapidfuzz():
    fuzz = pytest.importorskip("rapidfuzz.fuzz")
    for pred, gt, _, _ in TABLE:
        assert indel_ratio(pred, gt) == pytest.approx(fuzz.ratio(pred, gt), abs=1e-9)
    rng = random.Random(1234)
    alphabet = "ab c\n\té日"
    for _ in range(200):
        a = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 30)))
        b = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 30)))
        assert indel_ratio(a, b) == pytest.approx(fuzz.ratio(a, b), abs=1e-9)


def test_bleu():
    assert bleu(["a b c d", "x y z w v"], ["a b c d", "x y z w v"]) == pytest.approx(100.0)
    # Disjoint, 4 tokens each: p_n = 1/5, 1/4, 1/3, 1/2; bp = 1 -> 100 * (1/120) ** 0.25.
    assert bleu(["a b c d"], ["e f g h"]) == pytest.approx(100 * (1 / 120) ** 0.25)
    assert bleu(["a b c d"], ["e f g h"]) == pytest.approx(30.2138, abs=1e-4)
    # Short prediction "a b" vs "a b c d": p = 3/3, 2/2, 1/1, 1/1 -> 1; bp = exp(1 - 4/2).
    assert bleu(["a b"], ["a b c d"]) == pytest.approx(100 * 2.718281828459045 ** -1)
    assert bleu([""], ["a"]) == 0.0
    with pytest.raises(CodeLlamaError):
        bleu(["a"], [])


class CharTokenizer:
    def encode(self, text, bos=False, eos=False):
        return [ord(c) for c in text]


def _write(tmp_path):
    for k in range(3):
        body = "".join(f"def f{k}_{i}(x):\n    return x + {i}\n\n" for i in range(40))
        (tmp_path / f"m{k}.py").write_text(body)
    return tmp_path


def test_build_examples(tmp_path):
    d = _write(tmp_path)
    tok = CharTokenizer()
    a = lcc.build_examples(d, tok, context_tokens=100, n_per_file=4, seed=7)
    b = lcc.build_examples(sorted(d.glob("*.py")), tok, context_tokens=100, n_per_file=4, seed=7)
    assert a == b and len(a) == 12
    assert a != lcc.build_examples(d, tok, context_tokens=100, n_per_file=4, seed=8)
    for ex in a:
        lines = open(ex.file).read().splitlines()
        assert ex.target == lines[ex.line - 1] and ex.target.strip()
        assert len(tok.encode(ex.context)) <= 100
        before = "".join(line + "\n" for line in lines[:ex.line - 1])
        assert before.endswith(ex.context) and ex.context
    with pytest.raises(CodeLlamaError):
        lcc.build_examples(d, tok, context_tokens=0)


def test_score_and_first_line():
    assert lcc.first_line("return x\nfoo") == "return x"
    assert lcc.first_line("") == ""
    exs = [lcc.Example("f", 1, "c", "return x"), lcc.Example("f", 2, "c", "abcd")]
    out = lcc.score(["return  x", "acbd"], exs)
    assert out["exact_match_codexglue"] == 50.0
    assert out["edit_similarity_lcc"] == pytest.approx((1600 / 17 + 75.0) / 2)
    assert out["edit_similarity"] == pytest.approx((1 - 1 / 9 + 1 - 2 / 4) / 2)
    assert out["bleu"] == pytest.approx(bleu(["return  x", "acbd"], ["return x", "abcd"]))


def test_run_lcc_fake_model():
    class Fake:
        def complete(self, prompt, max_new_tokens, stop):
            assert stop == ["\n"]
            return type("C", (), {"text": "abcd\nmore"})()
    exs = [lcc.Example("f", 1, "c", "abcd")]
    out = lcc.run_lcc(Fake(), exs)
    assert out["metrics"]["exact_match_codexglue"] == 100.0 and out["examples"][0]["prediction"] == "abcd"
    assert set(out["metric_definitions"]) == {"exact_match_codexglue", "edit_similarity_lcc", "edit_similarity", "bleu"}


def _cli(argv, capsys):
    from codellama.cli import main
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_lcc_on_a_directory_and_on_the_default_held_out_files(tmp_path, capsys):
    import json
    data = tmp_path / "src"
    data.mkdir()
    for i in range(2):
        (data / f"m{i}.py").write_text("".join(f"def f{j}(x):\n    return x + {j * (i + 1)}\n\n" for j in range(40)))
    out = tmp_path / "lcc.json"
    argv = ["eval", "lcc", "--data", str(data), "--n-per-file", "2", "--context-tokens", "128",
            "--max-new-tokens", "8", "--no-progress", "--output", str(out)]
    code, stdout, err = _cli(argv, capsys)
    assert code == 0, err
    res = json.loads(out.read_text())
    assert res["benchmark"] == "lcc" and res["model"] == "default" and res["metrics"]["examples"] == 4
    assert res["settings"]["context_tokens"] == 128 and res["settings"]["files"] == 2
    assert sorted(Path(e["file"]).name for e in res["examples"]) == ["m0.py", "m0.py", "m1.py", "m1.py"]
    assert all(e["target"] == e["target"].strip("\n") and e["target"].strip() for e in res["examples"])
    m = res["metrics"]
    assert 0 <= m["exact_match_codexglue"] <= 100 and 0 <= m["edit_similarity_lcc"] <= 100
    assert 0 <= m["edit_similarity"] <= 1 and 0 <= m["bleu"] <= 100
    assert "edit_similarity_lcc: LCC edit similarity" in stdout and "exact_match_codexglue" in stdout
    # The same command gives the same examples and predictions (greedy, seeded cut points).
    code, _, err = _cli(argv[:-1] + [str(tmp_path / "again.json")], capsys)
    again = json.loads((tmp_path / "again.json").read_text())
    assert code == 0 and again["examples"] == res["examples"] and again["metrics"] == res["metrics"]
    # Default data: the held-out standard library.
    code, _, err = _cli(["eval", "lcc", "--limit", "1", "--n-per-file", "1", "--max-new-tokens", "4",
                         "--no-progress", "--quiet", "--output", str(tmp_path / "std.json")], capsys)
    assert code == 0, err
    std = json.loads((tmp_path / "std.json").read_text())
    assert std["settings"]["data"] == "stdlib held-out split" and std["settings"]["context_tokens"] == 1024 - 4
    # Bad input: one clear line, exit 2.
    code, _, err = _cli(["eval", "lcc", "--data", str(data), "--context-tokens", "5000"], capsys)
    assert code == 2 and err.startswith("error: ") and "fit the model's context" in err
    code, _, err = _cli(["eval", "lcc", "--data", str(tmp_path / "missing")], capsys)
    assert code == 2 and "no such file or directory" in err
