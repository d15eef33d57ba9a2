"""
bench.py -- the performance table: measured numbers, never timed unit tests.

    python bench.py                 # every section
    python bench.py tokenizer       # one section

Machines are shared and noisy, so each figure is the median of several runs,
and two things that are compared are timed alternately. Reference figures
from other projects were measured on this project's 2-core machine (noted in
the issue tracker) and are printed beside ours.
"""

import argparse
import os
import statistics
import sys
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


def bench_gpt2_step():
    """One AdamW step of the GPT-2 124M shape at batch 4 x 256, in a child process so
    that its peak memory (ru_maxrss) is its own."""
    import resource
    import subprocess

    code = ("import time, torch; from model import CausalLM, preset\n"
            "m = CausalLM(preset('gpt2')); opt = torch.optim.AdamW(m.parameters(), lr=1e-4)\n"
            "idx = torch.randint(0, 50257, (4, 257)); t = time.time()\n"
            "_, loss = m(idx[:, :-1], idx[:, 1:]); loss.backward(); opt.step()\n"
            "print(f'{time.time() - t:.1f} {loss.item():.3f}')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).parent, check=True).stdout.split()
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB
    print("GPT-2 124M shape, CPU fp32, 2 threads")
    row("train step 4x256 (fwd + bwd + AdamW)", f"{float(out[0]):.1f} s", "", f"peak RSS {peak:.1f} GiB, loss {out[1]}")


def bench_decode():
    """Greedy decoding on a Qwen3-0.6B-shaped model with random weights (no download):
    ours in bf16 and fp32 beside transformers' generate in fp32 on the same weights,
    one thread each, alternating, the same number of new tokens."""
    import tempfile

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
#> L07 bench-train
# -----------------------------------------------------------------------------
# Training throughput (lessons 06-08)


def bench_train():
    """config/shakespeare_char.py's shape (4 x 128, context 64, batch 12, vocab 65): our
    block (RoPE, RMSNorm, SwiGLU) against GPT-2's (learned positions, LayerNorm, GELU,
    biases) in the same run, one thread each, alternating; a full optimizer step each."""
    import torch

    from model import CausalLM, ModelConfig, clip_grad_norm
    from pretrain import AdamW, param_groups

    torch.set_num_threads(1)
    print("training step, shakespeare_char shape, CPU, 1 thread, fp32")
    steps = {}
    for name, style in (("ours", {}), ("gpt2-style", dict(pos_emb="learned", norm="layernorm",
                                                           mlp="gelu", bias=True))):
        torch.manual_seed(0)
        model = CausalLM(ModelConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, **style))
        opt = AdamW(param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.95))
        x, y = torch.randint(0, 65, (2, 12, 64))

        def step(model=model, opt=opt, x=x, y=y):
            _, loss = model(x, y)
            loss.backward()
            clip_grad_norm(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()
        steps[name] = (step, model.num_params())
    t_ours, t_gpt2 = alternate(lambda: [steps["ours"][0]() for _ in range(10)],
                               lambda: [steps["gpt2-style"][0]() for _ in range(10)])
    for name, t in (("ours", t_ours), ("gpt2-style", t_gpt2)):
        row(f"{name} ({steps[name][1] / 1e6:.2f}M params)", f"{t * 100:.0f} ms/step",
            "57 ms/step (nanoGPT ref)", f"{768 * 10 / t:,.0f} tok/s")


SECTIONS["train"] = bench_train
#< L07
#> L10 bench-sft


def bench_sft():
    """sft.py's step on config/tiny.py's model, padded against packed: the same 16
    conversations of the built-in set per step, so the same loss; tokens/s counts
    conversation tokens only. One thread, the precision sft.py picks, alternating."""
    import torch

    import sft
    from model import CausalLM, ModelConfig, setup_precision
    from tokenizer import BPETokenizer, read_conversations

    root = Path(__file__).resolve().parent / "data"
    if not (root / "sft" / "train.jsonl").exists() or not (root / "storyworld" / "tokenizer.json").exists():
        print("sft: skipped (run python data/prepare.py storyworld && python data/prepare.py sft)")
        return
    torch.set_num_threads(1)
    tok = BPETokenizer.load(root / "storyworld" / "tokenizer.json")
    chats = read_conversations(root / "sft" / "train.jsonl", tok)[:16 * 10]
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(vocab_size=tok.vocab_size, block_size=256, n_layer=4, n_head=4, n_embd=128))
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
#> L15 bench-attention
# -----------------------------------------------------------------------------
# Attention: time and memory against T (lesson 15)

ATTENTION_IMPLS = ("naive", "sdpa", "flash", "triton")


def attention_point(impl, T, B=1, nh=8, hs=64):
    """One forward + backward of causal attention, in a fresh process (bench_attention starts it):
    prints `seconds peak_MiB` as JSON. Memory is what the call adds on top of its inputs: on a
    CPU the peak resident set (ru_maxrss) minus the one before the first call; on CUDA torch's
    max_memory_allocated minus memory_allocated before it."""
    import json
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
    import json
    import subprocess

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
    chosen = ap.parse_args().sections or list(SECTIONS)
    if unknown := set(chosen) - set(SECTIONS):
        ap.error(f"unknown sections {sorted(unknown)}; choose from {list(SECTIONS)}")
    for name in chosen:
        SECTIONS[name]()
        sys.stdout.flush()
