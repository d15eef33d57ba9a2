#> L08 tests
"""Lesson 08: the training loop, checkpoints, exact resume, failures, DDP."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import prepare
import pretrain
from model import sdpa_attention
from run import load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    prepare.prepare_storyworld(root / "storyworld", stories=300, val_stories=30, vocab_size=400)
    return root


def config(data_dir, out, **kw):
    base = dict(pretrain.DEFAULTS, data_dir=str(data_dir), out_dir=str(out), block_size=32, batch_size=4,
                n_layer=2, n_embd=32, n_head=2, max_iters=20, warmup_iters=5, eval_interval=10,
                eval_iters=2, log_interval=5, sample_tokens=8)
    return {**base, **kw}


def test_training_lowers_the_loss_and_writes_checkpoint_and_log(data_dir, tmp_path):
    result = pretrain.train(config(data_dir, tmp_path, max_iters=120, lr=1e-2, eval_interval=60))
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert log[0]["train_loss"] > 5.5 and log[-1]["val_loss"] < 4.5  # from ~ln(400) = 6.0
    assert result["step"] == 120 and result["val_loss"] == log[-1]["val_loss"]
    ckpt = load_checkpoint(tmp_path / "ckpt.pt")
    assert ckpt["step"] == 120 and ckpt["model_config"]["n_embd"] == 32
    assert {"step", "tokens", "train_loss", "lr", "grad_norm", "ms_per_step", "tok_per_s"} <= log[0].keys()


def test_resume_is_bit_identical(data_dir, tmp_path, monkeypatch, ctrl_c_at):
    """20 steps straight == 10 steps, Ctrl-C, resume, 10 more: every parameter bit-equal.
    Guards everything a resume must restore: weights, optimizer moments, step, lr
    schedule, the data position and the RNG (dropout is on)."""
    pretrain.train(config(data_dir, tmp_path / "straight", dropout=0.1, eval_interval=7))
    ctrl_c_at(pretrain, 10)
    assert pretrain.train(config(data_dir, tmp_path / "split", dropout=0.1, eval_interval=7))["step"] == 10
    monkeypatch.undo()
    pretrain.train(config(data_dir, tmp_path / "split", dropout=0.1, eval_interval=7, resume=True))
    a = load_checkpoint(tmp_path / "straight" / "ckpt.pt")
    b = load_checkpoint(tmp_path / "split" / "ckpt.pt")
    assert a["step"] == b["step"] == 20
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_divergence_stops_with_a_message_and_keeps_the_last_checkpoint(data_dir, tmp_path):
    pretrain.train(config(data_dir, tmp_path, max_iters=10))
    before = (tmp_path / "ckpt.pt").read_bytes()
    with pytest.raises(FloatingPointError, match="training diverged. The last good checkpoint stays"):
        pretrain.train(config(data_dir, tmp_path, max_iters=40, resume=True, lr=1e12, warmup_iters=0,
                              grad_clip=0.0, eval_interval=1000))
    assert (tmp_path / "ckpt.pt").read_bytes() == before


def test_checkpoint_carries_its_tokenizer(data_dir, tmp_path):
    """A checkpoint that stored only the path of its tokenizer file broke as soon as the run
    folder or the data moved: the tokenizer's state must travel inside ckpt.pt."""
    from run import load_tokenizer
    from tokenizer import BPETokenizer

    pretrain.train(config(data_dir, tmp_path, max_iters=2))
    state = load_checkpoint(tmp_path / "ckpt.pt")["tokenizer"]  # weights_only=True accepts it
    original = BPETokenizer.load(data_dir / "storyworld" / "tokenizer.json")
    assert state == original.state()
    text = "One day, Lily found a red ball.<|endoftext|>"
    ids = original.encode(text, allowed_special="all")
    assert load_tokenizer(state).encode(text, allowed_special="all") == ids


def test_resume_refuses_another_run_and_allows_a_longer_one(data_dir, tmp_path):
    """--resume into another model shape used to fail inside load_state_dict with torch's
    message, and into another batch size or dataset of the same shape to silently train
    something else. Each difference is named; schedule and logging keys may change."""
    pretrain.train(config(data_dir, tmp_path, max_iters=10))
    resume = lambda data=data_dir, **kw: pretrain.train(config(data, tmp_path, max_iters=12, resume=True, **kw))
    with pytest.raises(ValueError, match=r"cannot resume .*: batch_size 4 -> 8 differ from the checkpoint"):
        resume(batch_size=8)
    with pytest.raises(ValueError, match=r": n_embd 32 -> 64, head_dim 16 -> 32, n_inner 96 -> 192 differ"):
        resume(n_embd=64)
    other = tmp_path / "other"  # the same dataset name prepared with another vocabulary
    prepare.prepare_storyworld(other / "storyworld", stories=300, val_stories=30, vocab_size=380)
    with pytest.raises(ValueError, match=r"vocab_size 400 -> 380, tokenizer \(the dataset was prepared"):
        resume(other)
    assert resume(eval_interval=3, log_interval=2, lr=5e-4)["step"] == 12


def test_cli_errors_are_one_clear_line(tmp_path):
    """Bad input ends with the problem and the fix, not a traceback."""
    for args, message in ((["config/tiny.py", "--lrr=1"], "unknown config key 'lrr'; valid keys:"),
                          (["config/tiny.py", f"--out_dir={tmp_path}", "--resume"], "no checkpoint at")):
        r = subprocess.run([sys.executable, "pretrain.py", *args], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_checkpoints_are_atomic_and_loaded_safely(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)})

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1  # the old one survived the crash
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*missing.pt; train one first.*--init"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(subprocess.Popen, protocol=2))  # not tensors: refused
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(tmp_path / "evil.pt")


def run(args, **kw):
    # subtle: a shell without job control starts background jobs (`cmd &`) with SIGINT
    # ignored, children inherit that, and Python then installs no Ctrl-C handler at all:
    # the test's Ctrl-C would be lost. The child gets the default disposition back.
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kw)


def cli_args(data_dir, out, *extra):
    keys = dict(data_dir=data_dir, out_dir=out, block_size=32, batch_size=4, n_layer=2, n_embd=32,
                n_head=2, warmup_iters=5, eval_iters=2, log_interval=1, sample_tokens=8)
    return ["pretrain.py", "config/tiny.py", *[f"--{k}={v}" for k, v in keys.items()], *extra]


def wait_for(path, timeout=60):
    """Until `path` exists and is not empty (log.jsonl is created before step 1 ends)."""
    t0 = time.time()
    while not (Path(path).exists() and Path(path).stat().st_size > 0):
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.1)


@pytest.mark.slow
def test_ctrl_c_saves_and_kill_9_resumes(data_dir, tmp_path):
    """Ctrl-C: a checkpoint and exit code 0. kill -9: the last checkpoint survives and
    --resume continues from its step to the end."""
    proc = run(cli_args(data_dir, tmp_path / "c", "--max_iters=100000", "--eval_interval=100000"))
    wait_for(tmp_path / "c" / "log.jsonl")
    proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # say what the run was doing, and leave no process behind
        proc.kill()
        pytest.fail("no exit 60 s after Ctrl-C; the run's last output:\n" + proc.communicate()[0][-1500:])
    assert proc.returncode == 0 and "interrupted at step" in out
    assert load_checkpoint(tmp_path / "c" / "ckpt.pt")["step"] > 0
    proc = run(cli_args(data_dir, tmp_path / "k", "--max_iters=100000", "--eval_interval=5"))
    wait_for(tmp_path / "k" / "ckpt.pt")
    proc.kill()
    proc.communicate()
    step = load_checkpoint(tmp_path / "k" / "ckpt.pt")["step"]
    done = subprocess.run([sys.executable, *cli_args(data_dir, tmp_path / "k", f"--max_iters={step + 10}",
                                                      "--eval_interval=5", "--resume")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resumed from {tmp_path / 'k' / 'ckpt.pt'} at step {step}" in done.stdout
    assert load_checkpoint(tmp_path / "k" / "ckpt.pt")["step"] == step + 10


@pytest.mark.slow
def test_ddp_two_processes_equal_one_with_double_accumulation(data_dir, tmp_path):
    """torchrun, 2 CPU processes (gloo) x 1 micro-batch == 1 process x 2 micro-batches:
    same micro-batches, gradients averaged, so the same loss curve (1e-4) and weights."""
    common = ["--max_iters=5", "--eval_interval=5", "--dropout=0.0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          *cli_args(data_dir, tmp_path / "ddp", *common)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert ddp.returncode == 0, ddp.stdout + ddp.stderr
    one = subprocess.run([sys.executable, *cli_args(data_dir, tmp_path / "one", *common, "--grad_accum=2")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stdout + one.stderr
    curve = lambda d: [r["train_loss"] for r in map(json.loads, open(tmp_path / d / "log.jsonl"))]
    assert len(curve("ddp")) == 5
    assert curve("ddp") == pytest.approx(curve("one"), abs=1e-4)
    a, b = (load_checkpoint(tmp_path / d / "ckpt.pt")["model"] for d in ("ddp", "one"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_cpu_bf16_training_attention_runs_in_fp32():
    """Under bf16 autocast on a CPU, attention with gradients runs on fp32 copies (its bf16
    backward is ~4x slower there). Guards autocast quietly casting them back to bf16: the
    output must be the fp32 result rounded once, and gradients must reach q, k and v."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8, generator=g).bfloat16().requires_grad_() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sdpa_attention(q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref.bfloat16(), atol=0, rtol=0)
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in (q, k, v))


def test_compile_auto_falls_back_to_eager_with_one_line(monkeypatch):
    """compile="auto" on a machine where torch.compile cannot run (no C++ compiler) must
    train eagerly and say why in one line, not crash at the first step; True must not
    hide the failure; anything else is a config error."""
    model, lines = torch.nn.Linear(2, 2), []

    def broken(fn, *a, **k):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\n(more)")

    monkeypatch.setattr(torch, "compile", broken)
    assert pretrain.compile_model(model, "auto", torch.device("cpu"), lines.append) is model
    assert len(lines) == 1 and "off" in lines[0] and "No working C++ compiler" in lines[0]
    assert pretrain.compile_model(model, None, torch.device("cpu"), lines.append) is model
    with pytest.raises(RuntimeError, match="C\\+\\+ compiler"):
        pretrain.compile_model(model, True, torch.device("cpu"), lines.append)
    with pytest.raises(ValueError, match="compile='yes'"):
        pretrain.compile_model(model, "yes", torch.device("cpu"), lines.append)
#< L08
