#> L09 tests
"""Lesson 09: perplexity, multiple choice, pass@k and the sandbox, chat.py."""

import itertools
import math
import os
import subprocess
import sys
from math import comb
from pathlib import Path

import numpy as np
import pytest
import torch

import eval as E
import prepare
import pretrain
from model import ModelConfig
from run import decode_stream
from tokenizer import CharTokenizer

from conftest import run_doctests

ROOT = Path(__file__).resolve().parents[1]


class TableModel(torch.nn.Module):
    """A fake model: logits at each position come from a (V, V) table indexed by the
    current token, so every log-probability is known by hand."""

    def __init__(self, table, block_size=8):
        super().__init__()
        self.table = torch.as_tensor(table, dtype=torch.float32)
        self.cfg = ModelConfig(vocab_size=len(self.table), block_size=block_size, n_embd=8, n_head=1)

    def forward(self, idx, targets=None):
        return self.table[idx], None


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    ids = np.random.default_rng(0).integers(0, 37, 500)
    assert E.perplexity(TableModel(torch.zeros(37, 37), 16), ids)["ppl"] == pytest.approx(37)


def test_perplexity_hand_computed_two_tokens():
    """ids [0, 1, 0]: p(1 | 0) and p(0 | 1) from the table, by hand."""
    table = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    p1_given_0 = math.exp(1) / (1 + math.exp(1))
    p0_given_1 = math.exp(2) / (math.exp(2) + 1)
    nll = -(math.log(p1_given_0) + math.log(p0_given_1)) / 2
    out = E.perplexity(TableModel(table), [0, 1, 0])
    assert out["tokens"] == 2 and out["ppl"] == pytest.approx(math.exp(nll))


@pytest.mark.parametrize("n, block, stride", [(50, 8, 8), (50, 8, 3), (9, 8, 4), (100, 16, 5), (2, 8, 8)])
def test_stride_scores_every_token_exactly_once(n, block, stride, monkeypatch):
    """With ids = 0..n-1 each target's value is its position: record what gets scored."""
    seen, real = [], E.token_logprobs

    def recording(logits, y):
        seen.extend(y[y != -1].tolist())  # the targets this window scores
        return real(logits, y)

    monkeypatch.setattr(E, "token_logprobs", recording)
    E.perplexity(TableModel(torch.zeros(n, n), block), np.arange(n), stride=stride)
    assert sorted(seen) == list(range(1, n))


def test_bits_per_byte_uses_the_bytes_of_the_scored_text():
    tok = CharTokenizer.train("abé")  # é is 2 bytes in UTF-8
    ids = tok.encode("abéabé")
    out = E.perplexity(TableModel(torch.zeros(3, 3)), ids, tok=tok)
    assert out["bits_per_byte"] == pytest.approx(5 * math.log2(3) / len("béabé".encode()))


def test_multiple_choice_rigged_model_and_length_normalisation():
    tok = CharTokenizer.train(" abcd")
    rigged = torch.zeros(5, 5)
    rigged[:, tok.encode("c")[0]] = 10.0  # always prefers "c"
    items = [("d", ["a", "b", "c", "d"], 2), ("d", ["c", "d", "a", "b"], 0)]
    out = E.multiple_choice(TableModel(rigged), tok, items)
    assert out["acc"] == 1.0 and out["chance"] == 0.25
    # p(a) = e^-2, p(b) = e^-1 (rest on "d"): "a" sums to -2, "bbb" to -3 but averages -1.
    p = torch.tensor([0.0, math.exp(-2), math.exp(-1), 0.0, 1 - math.exp(-2) - math.exp(-1)])
    table = torch.log(p.clamp(min=1e-30)).expand(5, 5)
    scores = E.score_options(TableModel(table), tok, "d", ["a", "bbb"])
    assert scores[0][0] == pytest.approx(-2, abs=1e-4) and scores[1][0] == pytest.approx(-3, abs=1e-4)
    assert scores[1][1] == pytest.approx(-1, abs=1e-4)
    out = E.multiple_choice(TableModel(table), tok, [("d", ["a", "bbb"], 1)])
    assert out["acc"] == 0.0 and out["acc_norm"] == 1.0  # normalisation changes the answer


def test_story_cloze_items_end_right_before_the_answer():
    """The context must stop exactly where the right option continues the real story."""
    import storyworld

    for kind in ("colour", "pronoun"):
        items = E.story_cloze_items(kind, n=30)
        for story, (context, options, answer) in zip(storyworld.stories(1337, 20000, 30), items):
            assert story.text.startswith(context + options[answer] + " ")
            assert len(set(options)) == len(options) == (4 if kind == "colour" else 2)


def test_mmlu_reader_and_bad_rows(tmp_path):
    (tmp_path / "dev.csv").write_text("What is 1+1?,1,2,3,4,B\n")
    (tmp_path / "test.csv").write_text('"Capital of France, please?",Rome,Paris,Oslo,Bern,B\n')
    items = E.read_mmlu(tmp_path / "test.csv", tmp_path / "dev.csv", shots=1)
    context, options, answer = items[0]
    assert context == ("What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: 2\n\n"
                       "Capital of France, please?\nA. Rome\nB. Paris\nC. Oslo\nD. Bern\nAnswer:")
    assert options == [" Rome", " Paris", " Oslo", " Bern"] and answer == 1
    (tmp_path / "bad.csv").write_text("q,a,b,c,d,B\nq,a,b,c,E\n")
    with pytest.raises(ValueError, match="bad.csv:2: expected question,A,B,C,D,answer-letter"):
        E.read_mmlu(tmp_path / "bad.csv")


# ---- pass@k and the sandbox ---------------------------------------------------


@pytest.mark.parametrize("n, c, k", [(5, 2, 1), (5, 2, 3), (6, 0, 2), (6, 6, 2), (7, 3, 7), (10, 1, 4)])
def test_pass_at_k_equals_brute_force(n, c, k):
    """Average over every k-subset of n samples (c correct) of 'some sample passes'."""
    samples = [True] * c + [False] * (n - c)
    brute = sum(any(s) for s in itertools.combinations(samples, k)) / comb(n, k)
    assert E.pass_at_k(n, c, k) == pytest.approx(brute)


def test_sandbox_passes_canonical_and_fails_wrong_solutions():
    problems = E.read_problems(ROOT / "data" / "problems.jsonl")
    assert len(problems) == 12
    for p in problems:
        assert E.run_sandboxed(E.program_for(p, p["canonical_solution"]))["status"] == "passed", p["task_id"]
    wrong = E.run_sandboxed(E.program_for(problems[0], "    return a - b\n"))
    assert wrong["status"] == "failed" and not wrong["passed"] and "AssertionError" in wrong["stderr"]


def test_sandbox_contains_loops_memory_and_fork_bombs():
    r = E.run_sandboxed("while True:\n    pass\n", timeout=1.0)
    assert r["status"] == "timeout" and r["seconds"] < 3.0
    r = E.run_sandboxed("x = bytearray(8 * 2**30)\n")  # 8 GiB: refused by the address-space limit
    assert r["status"] == "failed" and "MemoryError" in r["stderr"]
    r = E.run_sandboxed("import os\nwhile True:\n    os.fork()\n", timeout=2.0)
    assert r["status"] == "failed" and "disabled in the sandbox" in r["stderr"]
    r = E.run_sandboxed("import multiprocessing\nps = [multiprocessing.Process(target=print) for _ in range(200)]\n"
                        "[p.start() for p in ps]\n", timeout=5.0)
    assert r["status"] in ("failed", "timeout")  # the process limit or the stubs stop it


def test_sandbox_protects_files_and_environment(tmp_path, monkeypatch):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    program = (f"import os, pathlib, shutil\n"
               f"for f in (lambda: os.remove({str(victim)!r}), lambda: pathlib.Path({str(victim)!r}).unlink(),\n"
               f"          lambda: shutil.rmtree({str(tmp_path)!r}), lambda: open({str(victim)!r}, 'w')):\n"
               f"    try:\n        f()\n    except Exception as e:\n        print(type(e).__name__)\n"
               f"print(os.environ.get('SECRET_TOKEN'))\n")
    r = E.run_sandboxed(program)
    assert victim.read_text() == "keep me"
    assert "hunter2" not in r["stdout"] and r["stdout"].strip().endswith("None")
    if os.geteuid() == 0:  # as root the child runs as nobody: the parent's environ is unreadable
        r = E.run_sandboxed("import os\nprint(open(f'/proc/{os.getppid()}/environ').read())")
        assert r["status"] == "failed" and "hunter2" not in r["stdout"] + r["stderr"]


def test_malformed_problem_file_names_the_line(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"task_id": "x"}\n')
    with pytest.raises(ValueError, match="p.jsonl:1: not a HumanEval-format line"):
        E.read_problems(tmp_path / "p.jsonl")


# ---- on a real (tiny) checkpoint ----------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    prepare.prepare_storyworld(root / "data" / "storyworld", stories=300, val_stories=30, vocab_size=400)
    cfg = dict(pretrain.DEFAULTS, data_dir=str(root / "data"), out_dir=str(root / "out"), block_size=64,
               batch_size=8, n_layer=2, n_embd=32, n_head=2, max_iters=150, lr=1e-2, warmup_iters=10,
               eval_interval=150, eval_iters=2, log_interval=50, sample_tokens=8)
    pretrain.train(cfg)
    return root / "out"


def test_eval_cli_writes_results_beside_the_checkpoint(ckpt, capsys):
    E.main(["--ckpt", str(ckpt), "--task", "ppl", "mc", "story", "--limit", "10"])
    out = capsys.readouterr().out
    assert out.startswith("ppl") and "bits_per_byte" in out
    import json

    ppl = json.loads((ckpt / "eval_ppl.json").read_text())
    assert 1 < ppl["ppl"] < 400 and ppl["tokens"] > 1000
    mc = json.loads((ckpt / "eval_mc.json").read_text())
    assert mc["colour_items"] == mc["pronoun_items"] == 10
    assert mc["colour_chance"] == 0.25 and mc["pronoun_chance"] == 0.5
    assert json.loads((ckpt / "eval_story.json").read_text())["items"] == 10


def test_a_run_folder_works_wherever_it_is_copied(ckpt, tmp_path, capsys):
    """eval.py and chat.py read the tokenizer from the checkpoint, not from the data folder
    the run was trained on: copy the run away, remove the data, and both still work. An old
    checkpoint that stored the tokenizer's path still loads while that file exists."""
    import shutil

    from run import load_checkpoint, load_run, save_checkpoint

    moved = shutil.copytree(ckpt, tmp_path / "moved")
    data = ckpt.parent / "data"
    data.rename(ckpt.parent / "gone")
    try:
        E.main(["--ckpt", str(moved), "--task", "ppl", "story", "--limit", "3"])
        out = capsys.readouterr().out
        assert "ppl   skipped: no pretraining data at" in out and "story items 3" in out
        r = subprocess.run([sys.executable, str(ROOT / "chat.py"), str(moved)], input="/len 5\nOnce\n",
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert any(line.startswith("Once") and len(line) > 4 for line in r.stdout.splitlines())
    finally:
        (ckpt.parent / "gone").rename(data)
    old = load_checkpoint(moved / "ckpt.pt")
    save_checkpoint(moved / "ckpt.pt", {**old, "tokenizer": str(data / "storyworld" / "tokenizer.json")})
    model, tok, _ = load_run(moved)
    assert tok.state() == old["tokenizer"]
    save_checkpoint(moved / "ckpt.pt", {**old, "tokenizer": str(tmp_path / "deleted.json")})
    with pytest.raises(FileNotFoundError, match="old checkpoint whose tokenizer file .* is gone"):
        load_run(moved)


def test_chat_streams_obeys_temp_and_exits_cleanly(ckpt):
    run = lambda text: subprocess.run([sys.executable, str(ROOT / "chat.py"), str(ckpt)], input=text,
                                      capture_output=True, text=True, timeout=120)
    r = run("/temp 0\n/len 12\nOnce\nOnce\n/topk x\n")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "temp set to 0.0" in lines and "len set to 12" in lines
    completions = [l for l in lines if l.startswith("Once")]
    assert len(completions) == 2 and completions[0] == completions[1] and len(completions[0]) > 4
    assert "/topk needs a number" in r.stdout
    r = run("")
    assert r.returncode == 0
    bad = subprocess.run([sys.executable, str(ROOT / "chat.py"), str(ckpt / "nope")], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 1 and "cannot load" in bad.stderr and "no checkpoint at" in bad.stderr


def test_docstring_examples():
    """The >>> examples lesson 09 wrote run as printed."""
    run_doctests(E.pass_at_k, decode_stream)
#< L09
