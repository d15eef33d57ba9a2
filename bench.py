"""
bench.py -- the performance table: measured numbers, never timed unit tests.

    python bench.py                 # every section
    python bench.py tokenizer       # one section
    python bench.py quant           # bytes per weight in fp32 .. NF4; NF4 beside bitsandbytes
    python bench.py train --vs-nanogpt ../nanoGPT   # beside a nanoGPT checkout, its CPU recipe

Machines are shared and noisy, so each figure is the median of several runs,
and two things that are compared are timed alternately. Reference figures
from other projects were measured on this project's 2-core machine (noted in
the issue tracker) and are printed beside ours.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(os.environ.get("INTRO2LLM_SHARED", Path(__file__).resolve().parent.parent / "shared"))


def timed(fn, repeats=5):
    """Median wall time of fn() over `repeats` runs, and its last result."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def alternate(fa, fb, repeats=5):
    """Median times of fa and fb, run a, b, a, b, ... so drifting load hits both alike."""
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(timed(fa, 1)[0])
        tb.append(timed(fb, 1)[0])
    return statistics.median(ta), statistics.median(tb)


def row(name, ours, reference="", note=""):
    print(f"  {name:<44}{ours:>18}   {reference:<24}{note}")


SECTIONS = {}  # name -> function; each lesson's section registers itself below


#> L01 bench-tokenizer
# -----------------------------------------------------------------------------
# Tokenizer (lesson 01)


def bench_tokenizer():
    import tiktoken

    from tokenizer import BPETokenizer

    path = SHARED / "data" / "tinyshakespeare.txt"
    if not path.exists():
        print(f"  skipped: {path} not found (the course's shared data folder)")
        return
    text = path.read_text()
    mb = len(text.encode()) / 1e6
    print(f"tokenizer on Tiny Shakespeare ({mb:.2f} MB), single process")
    row("", "ours", "minbpe / tiktoken (ref)")
    for vocab, ref in ((512, "60 s"), (1024, "163 s"), (4096, "")):
        seconds, _ = timed(lambda: BPETokenizer().train(text, vocab), 3)
        row(f"train to vocab {vocab}", f"{seconds:.2f} s", ref)
    tok = BPETokenizer().train(text, 1024)

    def cold():
        tok.cache.clear()
        return tok.encode_ordinary(text)

    seconds, _ = timed(cold)
    row("pure-Python encode, empty chunk cache", f"{mb / seconds:.2f} MB/s", "0.9 MB/s (minbpe)")
    seconds, _ = timed(lambda: tok.encode_ordinary(text))
    row("pure-Python encode, warm chunk cache", f"{mb / seconds:.2f} MB/s")
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "data" / "tiktoken_cache"))
    cl100k = tiktoken.get_encoding("cl100k_base")
    ours = BPETokenizer.from_tiktoken(cl100k)
    mine = ours.to_tiktoken()
    t_mine, t_ref = alternate(lambda: mine.encode_ordinary(text), lambda: cl100k.encode_ordinary(text))
    row("to_tiktoken() of cl100k ranks", f"{mb / t_mine:.1f} MB/s", f"{mb / t_ref:.1f} MB/s (tiktoken)",
        f"speed ours/tiktoken {t_ref / t_mine:.2f}")
    ours.cache.clear()
    seconds, _ = timed(lambda: (ours.cache.clear(), ours.encode_ordinary(text)), 3)
    row("pure-Python encode with cl100k ranks", f"{mb / seconds:.2f} MB/s")


SECTIONS["tokenizer"] = bench_tokenizer
#< L01
#> L05 bench-model
# -----------------------------------------------------------------------------
# Model (lessons 02-05)


def bench_model():
    import torch

    from model import CausalLM, preset

    torch.set_num_threads(1)  # compared figures: one thread each (this machine throttles two)
    print("model, CPU, 1 thread, fp32")
    model = CausalLM(preset("tiny", block_size=512)).eval()
    for prompt_len in (1, 256):  # 256 new tokens after an empty and after a full-block prompt
        prompt = torch.zeros(1, prompt_len, dtype=torch.long)
        run = lambda cache: model.generate(prompt, 256, temperature=0, use_cache=cache)
        t_cache, t_none = alternate(lambda: run(True), lambda: run(False), repeats=3)
        row(f"tiny: 256 new tokens after {prompt_len}, KV cache", f"{256 / t_cache:,.0f} tok/s")
        row(f"tiny: 256 new tokens after {prompt_len}, no cache", f"{256 / t_none:,.0f} tok/s", "",
            f"cache speed-up {t_none / t_cache:.1f}x")
    for name, B, T in (("tiny", 8, 256), ("small", 4, 256)):
        model = CausalLM(preset(name)).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        idx = torch.randint(0, model.cfg.vocab_size, (B, T + 1))

        def step():
            _, loss = model(idx[:, :-1], idx[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # warm-up: allocations, first-call overheads
        seconds, _ = timed(step, 3)
        row(f"{name} ({model.num_params() / 1e6:.1f}M): train step {B}x{T}", f"{B * T / seconds:,.0f} tok/s")


def matmul_peak(dtype_name, n=2048, repeats=5):
    """This CPU core's matmul FLOP/s: one (n, n) @ (n, n) product, 2 n^3 FLOPs, on one
    thread. The fastest of `repeats` runs: other jobs can only slow a run down, so the
    best one is the closest to what the hardware can do."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # and back after: the sections run after this one keep theirs
    try:
        a, b = (torch.randn(n, n).to(getattr(torch, dtype_name)) for _ in range(2))
        a @ b  # warm-up: oneDNN picks and caches its kernel on the first call
        times = [timed(lambda: a @ b, 1)[0] for _ in range(repeats)]
    finally:
        torch.set_num_threads(threads)
    return 2 * n ** 3 / min(times)


def bench_peak():
    print("matmul peak, one 2048 x 2048 product, CPU, 1 thread (best of 5)")
    for name in ("float32", "bfloat16"):
        row(name, f"{matmul_peak(name) / 1e9:.0f} GFLOP/s")


SECTIONS["peak"] = bench_peak
# One training step of GPT-2 124M, run by bench_gpt2_step in a child process.
GPT2_STEP = """
import json, time, torch
from contextlib import nullcontext
from model import CausalLM, preset
torch.set_num_threads(1)
torch.manual_seed(0)
m = CausalLM(preset('gpt2')); opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
idx = torch.randint(0, 50257, (4, 257))
ctx = torch.autocast('cpu', dtype=torch.bfloat16) if {bf16} else nullcontext()
times = []
for _ in range(2):  # the first step also allocates gradients and Adam's moments
    t = time.perf_counter()
    with ctx:
        _, loss = m(idx[:, :-1], idx[:, 1:])
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t)
print(json.dumps([times[-1], m.flops_per_token(256), loss.item()]))
"""


def bench_gpt2_step():
    """One AdamW step of the GPT-2 124M shape at batch 4 x 256 on one thread, fp32 and bf16
    autocast, each in a child process (its peak memory, ru_maxrss, is its own); MFU
    against this core's matmul peak in the same precision, measured first."""
    import resource

    print("GPT-2 124M shape, train step 4 x 256 (fwd + bwd + AdamW), CPU, 1 thread")
    for name, bf16 in (("float32", False), ("bfloat16", True)):
        peak = matmul_peak(name)
        out = subprocess.run([sys.executable, "-c", GPT2_STEP.format(bf16=bf16)], capture_output=True,
                             text=True, cwd=Path(__file__).parent, check=True).stdout
        seconds, flops_per_token, loss = json.loads(out.splitlines()[-1])
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB, largest child
        achieved = flops_per_token * 4 * 256 / seconds
        row(f"{'fp32' if name == 'float32' else 'bf16 autocast'}", f"{seconds:.1f} s/step",
            f"peak {peak / 1e9:.0f} GFLOP/s", f"{achieved / 1e9:.0f} GFLOP/s = MFU {achieved / peak:.0%}, "
            f"loss {loss:.3f}, peak RSS so far {rss:.1f} GiB")


def bench_decode():
    """Greedy decoding on a Qwen3-0.6B-shaped model with random weights (no download):
    ours in bf16 and fp32 beside transformers' generate in fp32 on the same weights,
    one thread each, alternating, the same number of new tokens."""
    import torch
    import transformers as tf

    from model import CausalLM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    shape = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True)
    theirs = tf.Qwen3ForCausalLM(tf.Qwen3Config(**shape)).eval()
    with tempfile.TemporaryDirectory() as folder:  # ours loads their files, as from a download
        theirs.save_pretrained(folder)
        ours = {dt: CausalLM.from_pretrained(folder, dtype=dt) for dt in (torch.float32, torch.bfloat16)}
    prompt, new = torch.randint(0, shape["vocab_size"], (1, 16)), 32
    with torch.inference_mode():
        hf = lambda: theirs.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        run = {dt: (lambda m=m: m.generate(prompt, new, temperature=0)) for dt, m in ours.items()}
        same = {dt: (f() == hf()).float().mean().item() for dt, f in run.items()}  # also the warm-up
        t_hf, t_bf16 = alternate(hf, run[torch.bfloat16], repeats=3)
        t_fp32 = timed(run[torch.float32], 3)[0]
    print(f"decode, Qwen3-0.6B shape (28 x 1024, GQA 16/8), {new} new tokens after 16, CPU, 1 thread")
    row("transformers generate, fp32", f"{new / t_hf:.2f} tok/s")
    row("ours, fp32", f"{new / t_fp32:.2f} tok/s", "", f"{t_hf / t_fp32:.2f}x transformers, "
        f"{same[torch.float32]:.0%} tokens equal")
    row("ours, bf16 weights", f"{new / t_bf16:.2f} tok/s", "", f"{t_hf / t_bf16:.2f}x transformers "
        f"fp32 (target 1.5x), {same[torch.bfloat16]:.0%} tokens equal")


SECTIONS["model"], SECTIONS["gpt2step"], SECTIONS["decode"] = bench_model, bench_gpt2_step, bench_decode
#< L05
#> L08 bench-train
# -----------------------------------------------------------------------------
# Training throughput (lessons 06-08)


NANOGPT_RECIPE = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
                  "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
                  "--n_embd=128", "--lr_decay_iters=2000", "--dropout=0.0"]  # its README's CPU line


def per_iteration_ms(program, cwd, args, threads, skip=20):
    """Median milliseconds per iteration of one training run in a child process, from its
    own per-iteration log, after the first `skip` iterations (warm-up, the first eval)."""
    # subtle: OpenMP threads spin while they wait; on a 2-core machine that other jobs share,
    # a second thread then waits for a core at every parallel op (~8 ms each, measured), and
    # a step of hundreds of small ops takes seconds. PASSIVE makes waiting threads sleep.
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               OMP_WAIT_POLICY="PASSIVE")
    stdout = run_checked([sys.executable, program, *args], cwd, env)
    if program == "train.py":  # nanoGPT prints `iter 42: loss 2.4, time 48.51ms, mfu ...`
        rows = [line.split() for line in stdout.splitlines() if line.startswith("iter ")]
        ms = {int(r[1].rstrip(":")): float(r[5].removesuffix("ms,")) for r in rows}
    else:  # ours writes one JSON line per logged step to out_dir/log.jsonl
        out_dir = next(a.split("=", 1)[1] for a in args if a.startswith("--out_dir="))
        logged = [json.loads(line) for line in open(Path(out_dir) / "log.jsonl")]
        ms = {r["step"]: r["ms_per_step"] for r in logged if "ms_per_step" in r}
    return statistics.median(t for i, t in ms.items() if i >= skip)


def bench_train(nanogpt=None, iters=300, runs=3, threads=(1, 2)):
    """Training throughput on nanoGPT's CPU recipe for Tiny Shakespeare (4 layers, 4 heads,
    128 wide, context 64, batch 12): pretrain.py on config/shakespeare_char.py, and, given
    a nanoGPT checkout, its train.py with its README's CPU command, alternately, on the same
    text, `iters` iterations per run, each in a child process with OMP_NUM_THREADS set.
    Everything runs in a temporary folder: nothing of nanoGPT enters this project."""
    text = SHARED / "data" / "tinyshakespeare.txt"
    if not text.exists():
        print(f"  skipped: {text} not found (the course's shared data folder)")
        return
    here = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prepare = [sys.executable, str(here / "data" / "prepare.py"), "shakespeare_char", "--source", str(text),
                   "--out", str(tmp / "data" / "shakespeare_char")]
        run_checked(prepare, here)
        variants = {}  # name -> (program, cwd, args); run in this order, round after round
        if nanogpt:
            theirs = tmp / "nanogpt"
            shutil.copytree(nanogpt, theirs, ignore=shutil.ignore_patterns(".git", "out*", "*.bin", "*.pt"))
            shutil.copy(text, theirs / "data" / "shakespeare_char" / "input.txt")  # its prepare.py reads it
            run_checked([sys.executable, "data/shakespeare_char/prepare.py"], theirs)
            variants["nanoGPT, fp32"] = ("train.py", theirs, NANOGPT_RECIPE + [f"--out_dir={tmp / 'out'}"])
        # Ours: the precision auto picks here, fp32 as nanoGPT runs, and compiled, whose
        # per-iteration figure leaves out the ~15-20 s it first spends compiling.
        for name, dtype, compiled in (("ours, dtype=auto (bf16 autocast)", "auto", False),
                                      ("ours, fp32", "float32", False),
                                      ("ours, bf16 autocast + compile", "auto", "auto")):
            variants[name] = ("pretrain.py", here, ["config/shakespeare_char.py", f"--data_dir={tmp / 'data'}",
                                                    f"--out_dir={tmp / 'out'}",
                                                    f"--dtype={dtype}", f"--compile={compiled}", "--log_interval=1",
                                                    "--eval_interval=250", "--eval_iters=20"])
        # With 2 threads: only nanoGPT and ours as auto runs it, and a third of the iterations.
        for n_threads in threads:
            n = iters if n_threads == 1 else iters // 3
            chosen = {k: v for i, (k, v) in enumerate(variants.items()) if n_threads == 1 or i < 1 + bool(nanogpt)}
            ms = {name: [] for name in chosen}
            for _ in range(runs):
                for name, (program, cwd, args) in chosen.items():
                    shutil.rmtree(tmp / "out", ignore_errors=True)  # a fresh run: no log or checkpoint
                    ms[name].append(per_iteration_ms(program, cwd, args + [f"--max_iters={n}"], n_threads))
            noisy = "" if n_threads == 1 else "; noisy: 2 threads on a 2-core machine shared with other jobs"
            print(f"training, nanoGPT's shakespeare_char CPU recipe, {n_threads} thread{'s' * (n_threads > 1)}, "
                  f"{runs} alternating runs x {n} iterations, median ms/iteration after the first 20{noisy}")
            for name, times in ms.items():
                t = statistics.median(times)
                note = ""
                if nanogpt and "nanoGPT" not in name:
                    ref = statistics.median(ms["nanoGPT, fp32"])
                    note = f"tokens/s ours / nanoGPT's = {ref / t:.2f}"
                row(name, f"{t:.1f} ms/iter", f"{12 * 64 / t * 1000:,.0f} tok/s",
                    note + f"  (runs: {', '.join(f'{x:.1f}' for x in times)})")
            sys.stdout.flush()


def run_checked(cmd, cwd, env=None):
    """stdout of a child process; if it fails, stop with the tail of what it printed."""
    run = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if run.returncode:
        sys.exit(f"{' '.join(map(str, cmd))} failed:\n{run.stdout[-2000:]}{run.stderr[-2000:]}")
    return run.stdout


SECTIONS["train"] = bench_train
#< L08
#> L10 bench-sft


def bench_sft():
    """sft.py's step on config/tiny.py's model, padded against packed: the same 16
    conversations of the built-in set per step, so the same loss; tokens/s counts
    conversation tokens only. One thread, the precision sft.py picks, alternating."""
    import torch

    import sft
    from model import CausalLM, preset
    from run import setup_precision
    from tokenizer import BPETokenizer

    root = Path(__file__).resolve().parent / "data"
    if not (root / "sft" / "train.jsonl").exists() or not (root / "storyworld" / "tokenizer.json").exists():
        print("sft: skipped (run python data/prepare.py storyworld && python data/prepare.py sft)")
        return
    torch.set_num_threads(1)
    tok = BPETokenizer.load(root / "storyworld" / "tokenizer.json")
    # sft.py's reader: it drops the chats longer than the context (12% of them), as training does
    chats = sft.load_conversations(root / "sft" / "train.jsonl", tok, 256, log=lambda *a: None)[:16 * 10]
    torch.manual_seed(0)
    model = CausalLM(preset("tiny", vocab_size=tok.vocab_size, block_size=256))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast, _, why = setup_precision(torch.device("cpu"))
    print(f"sft step, config/tiny.py's model, 16 conversations per step, CPU, 1 thread, {why}")
    layouts = {}
    for pack in (False, True):
        batches = sft.ChatBatches(chats, 16, 0, 256, pack)
        steps = [batches.get(i) for i in range(10)]

        def run(steps=steps):
            for x, y, seg, _ in steps:
                with autocast:
                    loss = model(x, y, segments=seg)[1]
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

        run()
        real = sum(n for *_, n in steps)
        layouts[pack] = (run, real, sum(x.numel() for x, *_ in steps))
    t_pad, t_pack = alternate(layouts[False][0], layouts[True][0], repeats=3)
    for name, t, (_, real, positions) in (("padded", t_pad, layouts[False]), ("packed", t_pack, layouts[True])):
        row(f"{name} ({1 - real / positions:.0%} of positions are padding)", f"{real / t:,.0f} tok/s",
            "", f"{t * 100:.0f} ms/step")
    print(f"  packing: {t_pad / t_pack:.2f}x the conversations per second")


SECTIONS["sft"] = bench_sft
#< L10
#> L14 bench-quant
# -----------------------------------------------------------------------------
# Quantization: what each storage format costs; NF4 beside bitsandbytes (lesson 14)


def format_bytes(n, fmt, blocksize=None):
    """Bytes to store n weights of one tensor in a format, its constants included.

    int8 and nf4 keep one fp32 absmax per block of 64 (blocksize: peft.NF4_BLOCK);
    nf4+dq keeps one byte per block plus an fp32 per 256 blocks and the fp32 mean.
    >>> [format_bytes(4096, f) for f in ("fp32", "bf16", "int8", "nf4", "nf4+dq")]
    [16384, 8192, 4352, 2304, 2120]
    """
    from peft import DQ_BLOCK, NF4_BLOCK

    blocks = -(-n // (blocksize or NF4_BLOCK))
    return {"fp32": 4 * n, "bf16": 2 * n, "int8": n + 4 * blocks, "nf4": (n + 1) // 2 + 4 * blocks,
            "nf4+dq": (n + 1) // 2 + blocks + 4 * -(-blocks // DQ_BLOCK) + 4}[fmt]


def memory_table(cfg):
    """Rows (format, bits per Linear weight, total bytes) for a model built on the meta device.

    As QLoRA does: the Linear layers of the blocks take the format; the
    embedding (tied output head) and the norms stay in bf16 (fp32 in the fp32 row).
    """
    import torch

    from model import CausalLM
    from peft import linear_names

    with torch.device("meta"):  # shapes only: no memory, works for a 0.6B model
        model = CausalLM(cfg)
    linear = [p.numel() for n in linear_names(model) for p in [model.get_submodule(n).weight]]
    rest = model.num_params() - sum(linear)
    rows = []
    for fmt in ("fp32", "bf16", "int8", "nf4", "nf4+dq"):
        quantized = sum(format_bytes(n, fmt) for n in linear)
        rows.append((fmt, 8 * quantized / sum(linear), quantized + rest * (4 if fmt == "fp32" else 2)))
    return rows, sum(linear), rest


def run_outside_repo(code, workdir, timeout=300):
    """Run `python -c code` with cwd=workdir and no PYTHONPATH, so `import peft` and
    `import kernels` find the installed libraries, not this folder's files. Returns stdout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TORCHDYNAMO_DISABLE"] = "1"  # bitsandbytes' CPU fallback would torch.compile per shape
    res = subprocess.run([sys.executable, "-c", code], cwd=workdir, env=env, capture_output=True,
                         text=True, timeout=timeout)
    if res.returncode:
        raise RuntimeError(f"subprocess failed:\n{res.stderr[-2000:]}")
    return res.stdout


BNB_ROUNDTRIP = """
import torch, bitsandbytes.functional as bnbf
W = torch.load("W.pt", weights_only=True)
for dq in (False, True):
    p, s = bnbf.quantize_4bit(W, quant_type="nf4", compress_statistics=dq)
    torch.save({"packed": p.reshape(-1), "W": bnbf.dequantize_4bit(p, s)}, f"bnb_{int(dq)}.pt")
"""


def nf4_error_report(seed=0):
    """Round-trip error of NF4 (and NF4 + DQ) on a 256x256 N(0, 1) matrix; bitsandbytes' beside."""
    import torch

    from peft import nf4_dequantize, nf4_quantize

    W = torch.randn(256, 256, generator=torch.Generator().manual_seed(seed))
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(W, Path(tmp) / "W.pt")
        try:
            run_outside_repo(BNB_ROUNDTRIP, tmp)
            theirs = [torch.load(Path(tmp) / f"bnb_{i}.pt", weights_only=True) for i in (0, 1)]
        except RuntimeError as e:
            theirs = None
            lines.append(f"(bitsandbytes not run: {str(e).strip().splitlines()[-1]}; "
                         "pip install -r requirements-dev.txt)")
    for dq in (False, True):
        packed, state = nf4_quantize(W, double_quant=dq)
        err = nf4_dequantize(packed, state) - W
        text = f"{'nf4+dq' if dq else 'nf4':<7} ours  rmse {err.pow(2).mean().sqrt():.5f}  max {err.abs().max():.4f}"
        if theirs:
            e2 = theirs[dq]["W"] - W
            same = torch.equal(theirs[dq]["packed"], packed) and torch.equal(theirs[dq]["W"], W + err)
            text += f"  | bitsandbytes rmse {e2.pow(2).mean().sqrt():.5f}  max {e2.abs().max():.4f}"
            text += f"  | bit-identical: {same}"
        lines.append(text)
    return lines


def bench_quant():
    """NF4's 16 values; bytes per format for tiny and Qwen3-0.6B; NF4's round-trip error."""
    from model import preset
    from peft import NF4_CODE

    print("NF4 code (Phi^-1 quantiles, scaled to [-1, 1]):")
    print("  " + " ".join(f"{v:+.4f}" for v in NF4_CODE.tolist()))
    for name in ("tiny", "qwen3-0.6b"):
        rows, n_linear, n_rest = memory_table(preset(name))
        print(f"\n{name}: {n_linear:,} Linear weights in the blocks + {n_rest:,} others "
              "(embedding, norms: bf16)")
        print(f"  {'format':<8}{'bits/weight':>12}{'total':>14}")
        for fmt, bits, total in rows:
            print(f"  {fmt:<8}{bits:>12.3f}{total / 2**20:>11.2f} MiB")
    print("\nNF4 round trip, 256x256 N(0,1) matrix (seed 0):")
    for line in nf4_error_report():
        print("  " + line)


SECTIONS["quant"] = bench_quant
#< L14
#> L15 bench-attention
# -----------------------------------------------------------------------------
# Attention: time and memory against T (lesson 15)

ATTENTION_IMPLS = ("naive", "sdpa", "flash", "triton")


def attention_point(impl, T, B=1, nh=8, hs=64):
    """One forward + backward of causal attention, in a fresh process (bench_attention starts it):
    prints `seconds peak_MiB` as JSON. Memory is what the call adds on top of its inputs: on a
    CPU the peak resident set (ru_maxrss) minus the one before the first call; on CUDA torch's
    max_memory_allocated minus memory_allocated before it."""
    import resource

    import torch

    import kernels
    from model import causal_mask, naive_attention, sdpa_attention

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    attend = {"naive": lambda q, k, v: naive_attention(q, k, v, causal_mask(q.size(2), k.size(2), q.device)),
              "sdpa": sdpa_attention, "flash": kernels.flash_attention,
              "triton": kernels.triton_attention}[impl]

    def inputs(T):
        return [torch.randn(B, nh, T, hs, device=device, requires_grad=True) for _ in range(4)]

    def step():
        attend(q, k, v).backward(dout)
        if cuda:
            torch.cuda.synchronize()

    q, k, v, dout = inputs(64)
    step()  # warm-up on a short sequence: loads lazily initialised code and thread pools
    q, k, v, dout = inputs(T)
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    step()  # the first call at this T sets the peak
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**10
    seconds, _ = timed(step, 3)
    print(json.dumps([seconds, peak]))


def bench_attention(Ts=(256, 512, 1024, 2048, 4096, 8192)):
    """Causal attention, forward + backward, B=1, 8 heads, head size 64, fp32: naive (model.py),
    SDPA (PyTorch's fused kernel) and ours (kernels.flash_attention; + the Triton kernel on CUDA).
    Each point runs in its own process so that its peak memory is its own."""
    import torch

    cuda = torch.cuda.is_available()
    impls = ATTENTION_IMPLS if cuda else ATTENTION_IMPLS[:3]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # one thread: comparable on a shared machine
    print(f"attention fwd+bwd, causal, B=1 nh=8 hs=64 fp32, {'CUDA' if cuda else 'CPU, 1 thread'}; "
          f"memory: {'max_memory_allocated' if cuda else 'peak RSS'} above the inputs, fresh process per point")
    row("T / impl", "time  |  peak memory", "", "flash vs naive" + ("  |  TFLOP/s" if cuda else ""))
    results = {impl: {} for impl in impls}
    for T in Ts:
        for impl in impls:
            code = f"import bench; bench.attention_point({impl!r}, {T})"
            run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 cwd=Path(__file__).parent, env=env)
            if run.returncode:  # e.g. killed for memory: say so and go on
                row(f"T={T} {impl}", "failed", "", run.stderr.strip().splitlines()[-1:] or f"rc {run.returncode}")
                continue
            seconds, peak = results[impl][T] = json.loads(run.stdout.split("\n")[-2])
            note = ""
            if impl == "flash" and T in results["naive"]:
                t_n, m_n = results["naive"][T]
                note = f"time {seconds / t_n:.2f}x, memory {peak / m_n:.3f}x"
            if cuda:  # 4 B T^2 hs per head forward (two matmuls), halved by the mask; backward 2.5x
                note += f"  {3.5 * 2 * 8 * T * T * 64 / seconds / 1e12:.1f}"
            row(f"T={T} {impl}", f"{seconds * 1e3:9.1f} ms | {peak:8.1f} MiB", "", note)
            sys.stdout.flush()
    flash = results["flash"]
    if len(flash) > 1:
        Ts_ok = sorted(flash)
        growth = [flash[b][1] / flash[a][1] for a, b in zip(Ts_ok, Ts_ok[1:])]
        print("  flash memory growth per doubling of T: " + ", ".join(f"{g:.2f}x" for g in growth)
              + " (linear: 2x, quadratic: 4x)")
    if both := sorted(set(flash) & set(results["naive"])):  # lesson 15's targets, at the longest T
        T, (t_f, m_f), (t_n, m_n) = both[-1], flash[both[-1]], results["naive"][both[-1]]
        print(f"  targets at T={T}: flash memory {m_f / m_n:.3f}x naive (want <= 0.1), "
              f"time {t_f / t_n:.2f}x naive (want <= 3)")
    plot_attention(results, "GPU" if cuda else "CPU")


def plot_attention(results, where, path=Path(__file__).parent / "out" / "bench_attention.png"):
    try:
        import matplotlib
    except ImportError:
        print("  (no plot: pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for impl, points in results.items():
        Ts = sorted(points)
        for ax, i in zip(axes, (0, 1)):
            ax.loglog(Ts, [points[T][i] for T in Ts], "o-", label=impl, base=2)
    for ax, label in zip(axes, ("forward + backward, seconds", "peak memory above inputs, MiB")):
        ax.set(xlabel="T (sequence length)", ylabel=label, title=f"causal attention, {where}")
        ax.legend()
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    print(f"  plot: {path}")


SECTIONS["attention"] = bench_attention
#< L15


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Print the performance table.")
    ap.add_argument("sections", nargs="*", help=f"any of: {', '.join(SECTIONS)} (default: all)")
    ap.add_argument("--vs-nanogpt", metavar="DIR", help="train: also time this nanoGPT checkout's train.py")
    args = ap.parse_args()
    chosen = args.sections or list(SECTIONS)
    if unknown := set(chosen) - set(SECTIONS):
        ap.error(f"unknown sections {sorted(unknown)}; choose from {list(SECTIONS)}")
    if args.vs_nanogpt and not (Path(args.vs_nanogpt) / "train.py").exists():
        ap.error(f"--vs-nanogpt {args.vs_nanogpt}: no train.py there; pass a nanoGPT checkout's folder")
    for name in chosen:
        SECTIONS[name](*([args.vs_nanogpt] if name == "train" else []))
        sys.stdout.flush()
