#> L06 run
"""
run.py -- what every stage's run needs, written once.

pretrain.py, sft.py, align.py and rl.py each teach their own loop; what those
loops have in common lives here, so a stage file shows only what is new in it:

  lesson 06  load_config (`name = value` files, --key=value), load_tokenizer
  lesson 07  get_lr (warmup + cosine) and clip_grad_norm
  lesson 08  device and precision, atomic checkpoints and exact resume, the
             optimizer step with its guards, the progress line, run_main
  lesson 09  load_run (a model and its tokenizer from any run folder); text
             streamed as tokens arrive; lesson 10 replies and exact match

    from run import load_run
    model, tok, ckpt = load_run("out/sft")   # a run folder, a ckpt.pt or a HF folder
"""

import contextlib
import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

import hf
from model import CausalLM, ModelConfig
from tokenizer import BPETokenizer, CharTokenizer, check_state, read_json
#> L14 import
import peft
#< L14

# -----------------------------------------------------------------------------
# Config files



def load_config(path, defaults, overrides=()):
    """Read a `name = value` config file, then `--name=value` overrides, strictly.

    The file is parsed as Python syntax but never executed: each line must
    assign a literal (number, string, bool, None, list), read by
    ast.literal_eval. Unknown names and wrong types are errors that list the
    valid names. The effective config is printed.
    """
    import ast

    cfg, valid = dict(defaults), ", ".join(sorted(defaults))

    def put(name, value, where):
        if name not in defaults:
            raise ValueError(f"{where}: unknown config key {name!r}; valid keys: {valid}")
        want = type(defaults[name])
        if defaults[name] is not None and not isinstance(value, want) and not (want is float and type(value) is int):
            raise ValueError(f"{where}: {name} must be {want.__name__}, got {value!r}")
        cfg[name] = float(value) if want is float else value

    if path:
        source = Path(path).read_text(encoding="utf-8")
        for node in ast.parse(source, str(path)).body:
            where = f"{path}:{node.lineno}"
            if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                    and isinstance(node.targets[0], ast.Name)):
                raise ValueError(f"{where}: expected `name = value`, got {ast.get_source_segment(source, node)!r}")
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                raise ValueError(f"{where}: the value of {node.targets[0].id} must be a literal "
                                 "(number, string, bool, None, list), not an expression") from None
            put(node.targets[0].id, value, where)
    for arg in overrides:
        name, sep, text = arg.removeprefix("--").partition("=")
        try:
            value = ast.literal_eval(text) if sep else True  # a bare --resume means True
        except (ValueError, SyntaxError):
            value = text  # a bare word: --dataset=shakespeare_char
        if isinstance(value, str) and value.startswith("~"):  # the shell expands ~ only at a word's start,
            value = str(Path(value).expanduser())  # not after --init=
        put(name, value, f"override {arg}")
    print("config: " + ", ".join(f"{k}={v!r}" for k, v in cfg.items()))
    return cfg


def load_tokenizer(source):
    """A CharTokenizer, BPETokenizer or hf.HFTokenizer, whichever `source` holds: a file path, or the
    state dict a checkpoint carries (so a run folder works wherever it is copied)."""
    where = "the checkpoint's tokenizer" if isinstance(source, dict) else source
    data = source if isinstance(source, dict) else read_json(source)
    kind = check_state(data, ("intro2llm-char", "intro2llm-bpe"), where)["format"]
    #> L10 real-templates
    if "chat_format" in data:  # a run made from Qwen3 or Llama 3: their chat template (hf.py)
        return hf.HFTokenizer.from_state(data, where)
    #< L10
    return (CharTokenizer if kind == "intro2llm-char" else BPETokenizer).from_state(data, where)
#< L06
#> L07 schedule exercise


def get_lr(it, cfg):
    """Linear warmup to lr, then cosine decay to min_lr at max_iters.

    Warmup: Adam's early second-moment estimates are noisy, so large first
    steps can diverge. Cosine: large steps while far from a minimum, small ones
    at the end to settle into it.
    """
    if it < cfg["warmup_iters"]:
        return cfg["lr"] * (it + 1) / cfg["warmup_iters"]
    progress = min(1.0, (it - cfg["warmup_iters"]) / max(1, cfg["max_iters"] - cfg["warmup_iters"]))
    return cfg["min_lr"] + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg["lr"] - cfg["min_lr"])


def clip_grad_norm(params, max_norm):
    """Scale all gradients by min(1, max_norm / ||g||), ||g|| over all of them together;
    returns ||g|| before clipping (logged: spikes warn of instability)."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    if max_norm > 0:
        torch._foreach_mul_(grads, torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    return norm
#< L07
#> L08 plumbing


def choose_device(requested="auto"):
    """cuda > mps > cpu, and say why: the first line of every run's log."""
    if requested != "auto":
        return torch.device(requested), f"{requested} (the config's device)"
    if torch.cuda.is_available():
        return torch.device("cuda"), f"cuda ({torch.cuda.get_device_name()})"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps"), "mps (Apple GPU)"
    return torch.device("cpu"), f"cpu ({os.cpu_count()} cores, no GPU found)"


def choose_dtype(device, requested="auto"):
    """Mixed-precision choice: bf16 where the hardware computes it natively, fp16 (+ loss
    scaling) on older GPUs, fp32 otherwise. Returns (dtype, reason)."""
    if requested != "auto":
        return getattr(torch, requested), f"{requested} (the config's dtype)"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "bf16 autocast (GPU supports bf16)"
        return torch.float16, "fp16 autocast + GradScaler (GPU lacks bf16)"
    if device.type == "cpu":
        flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
        if "avx512_bf16" in flags or "amx_bf16" in flags:
            return torch.bfloat16, "bf16 autocast (CPU has avx512_bf16/AMX)"
        return torch.float32, "fp32 (this CPU has no native bf16: emulated bf16 is slower)"
    return torch.float32, "fp32"


#> L08 atomic-save exercise
def save_checkpoint(path, state):
    """torch.save to a temporary file, then an atomic rename: a crash mid-write leaves
    the previous checkpoint intact, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
#< L08


def load_checkpoint(path, map_location="cpu"):
    """Load with weights_only=True: tensors and plain Python values only, so a
    checkpoint from elsewhere cannot execute code when loaded."""
    if not Path(path).exists():  # the option that named the path may be any of several
        raise FileNotFoundError(f"no checkpoint at {path}; train one first (python pretrain.py config/tiny.py "
                                "writes out/tiny, sft.py config/sft.py out/sft) or point the option that "
                                "named it (--init, --reward_init, --ckpt) at a run folder holding ckpt.pt")
    return torch.load(path, map_location=map_location, weights_only=True)


# -----------------------------------------------------------------------------
# The training loop's plumbing: pretrain.py, sft.py and align.py run the same


def setup_device(cfg):
    """(ddp, rank, world, device, why). Under torchrun (which sets RANK, WORLD_SIZE,
    LOCAL_RANK) there is one process per device; otherwise one process picks the best."""
    import torch.distributed as dist

    if "RANK" not in os.environ:
        return (False, 0, 1, *choose_device(cfg["device"]))
    backend = "nccl" if torch.cuda.is_available() else "gloo"  # nccl: GPUs; gloo: CPUs
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if backend == "nccl" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return True, rank, world, device, f"{device} (torchrun rank {rank} of {world}, {backend})"


def setup_precision(device, requested="auto"):
    """(autocast, scaler, why) for choose_dtype's choice. autocast runs matmuls in
    bf16/fp16 and keeps precision-sensitive ops (softmax, norms, the loss) in fp32;
    the weights and the optimizer stay fp32 throughout. The GradScaler is a no-op
    unless fp16, whose small range needs the loss scaled up before backward."""
    from contextlib import nullcontext

    dtype, why = choose_dtype(device, requested)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    return autocast, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16), why


def start_run(cfg, log=print):
    """(ddp, rank, world, device, log, autocast, scaler): this process's place in the run
    (setup_device), a log that prints on rank 0 only (one process prints, samples and
    writes files), and the precision (setup_precision), both named in the first line."""
    ddp, rank, world, device, why = setup_device(cfg)
    log = log if rank == 0 else (lambda *a, **k: None)
    autocast, scaler, precision = setup_precision(device, cfg["dtype"])
    log(f"device: {why}; precision: {precision}")
    return ddp, rank, world, device, log, autocast, scaler


# Keys of every stage's config: how it runs, not what it learns (DEFAULTS start here).
RUN_DEFAULTS = dict(
    device="auto",  # auto: cuda > mps > cpu
    dtype="auto",  # auto: bf16 where native, fp16 on old GPUs, else fp32
    resume=False,  # continue out_dir/ckpt.pt exactly where it stopped
)

# Keys a resumed run may change, in every stage: the schedule's tail (train longer, end
# lower), the remedies after a loss spike (a lower lr, clipping), what is printed and
# evaluated, how it runs. The rest define what the checkpoint was trained on and how: a
# change would silently continue a different run. Each stage adds its own few.
RESUMABLE = {"max_iters", "min_lr", "lr", "warmup_iters", "grad_clip", "eval_interval", "eval_iters",
             "log_interval", "resume", "device", "dtype", "compile"}


def optimizer_step(model, optimizer, scaler, loss, grad_clip, step, ckpt_path):
    """After backward: refuse a non-finite loss, clip, step, clear. Returns the gradient
    norm before clipping. model: the module whose gradients are clipped together, or a
    list of parameters (rl.py's PPO steps a policy and a critic as one)."""
    if not math.isfinite(loss.item()):  # stop before a NaN reaches a checkpoint
        raise FloatingPointError(f"loss is {loss.item()} at step {step}: training diverged. "
                                 f"The last good checkpoint stays at {ckpt_path}; try a lower lr")
    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    params = model.parameters() if isinstance(model, torch.nn.Module) else model
    norm = clip_grad_norm(params, grad_clip)
    scaler.step(optimizer)  # with fp16: skipped if the scaled gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)  # None, not zeros: frees memory, skips a fill
    return norm


def progress_line(step, max_iters, loss, lr, norm, dt, rate, eta, extra=""):
    """The log line: dt seconds per step, rate tokens/s, eta seconds left."""
    return (f"step {step}/{max_iters}  loss {loss:.4f}  lr {lr:.2e}  grad norm {norm:.2f}  "
            f"{dt * 1000:.0f} ms/step  {rate:,.0f} tok/s{extra}  ETA {eta / 60:.1f} min")


class RunLog:
    """out/log.jsonl: one JSON object per logged step, appended (a resumed run continues
    its file) and flushed at once, so a crash keeps every line. None: rank > 0 writes nothing."""

    def __init__(self, path):
        self.file, self.interrupted = open(path, "a") if path else None, False

    def write(self, row):
        if self.file:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()


@contextlib.contextmanager
def logged(out, master, log, save, step):
    """`with logged(out, master, log, checkpoint, lambda: step) as run_log:` around a loop.

    Ctrl-C inside saves a checkpoint with save() and leaves the block as if the loop had
    ended (run_log.interrupted tells the caller): what was learned is kept, and the
    command exits cleanly. step() says where it stopped. The log file is closed however
    the loop ends."""
    Path(out).mkdir(parents=True, exist_ok=True)
    run_log = RunLog(Path(out) / "log.jsonl" if master else None)
    try:
        yield run_log
    except KeyboardInterrupt:
        log(f"\ninterrupted at step {step()}: saving {Path(out) / 'ckpt.pt'}")
        save()
        run_log.interrupted = True
    finally:
        if run_log.file:
            run_log.file.close()


def plot_log(out, panels, x="step", name="loss.png", xlabel=None, ylabel=None):
    """out/log.jsonl -> out/name: one panel per list of keys, each key a curve against x.

    pretrain.py and sft.py draw train and val loss in one panel; align.py and rl.py one
    panel per metric (loss, accuracy, KL, ...). matplotlib is optional."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no window: write a file
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"plot skipped: pip install matplotlib to get {name}")
        return
    rows = [json.loads(line) for line in open(Path(out) / "log.jsonl")]
    one = len(panels) == 1
    fig, axes = plt.subplots(1, len(panels), figsize=(7, 4) if one else (3.5 * len(panels), 3), squeeze=False)
    for ax, keys in zip(axes[0], panels):
        for key in keys:
            pts = [(r[x], r[key]) for r in rows if key in r]
            if pts:  # an eval-only key (val loss) gets a marker: its points are sparse
                ax.plot(*zip(*pts), label=key.replace("_", " "), marker="." if key.startswith("val") or not one else None)
        ax.set_xlabel(xlabel or x)
        if ylabel:
            ax.set_ylabel(ylabel)
        if len(keys) > 1:
            ax.legend()
        else:
            ax.set_title(keys[0].replace("_", " "))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(Path(out) / name, dpi=120 if one else 110, bbox_inches="tight")
    plt.close(fig)  # pyplot keeps every figure until closed: a notebook's training calls pile up
    print(f"wrote {Path(out) / name}")


def training_state(model, optimizer, step, cfg, tok, **extra):
    """What a checkpoint holds: everything that shapes the next step (weights, Adam's
    moments, the step -- also the lr schedule's position and the next batch number --
    and the RNG, so dropout continues as if never stopped), the config, and the
    tokenizer itself, so the run folder stands alone wherever it is copied."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
            "rng": torch.get_rng_state(), "config": cfg, "model_config": model.cfg.__dict__,
            "tokenizer": tok.state(), **extra}


def resume_training(ckpt, model, optimizer):
    """Put a training_state back; returns the step to continue from."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])  # Adam's moments: without them, a jolt
    torch.set_rng_state(ckpt["rng"])
    return ckpt["step"]


def check_resume(ckpt, cfg, resumable, mcfg=None, tok=None):
    """Refuse to resume a checkpoint into a run that differs from it, naming each
    difference. Called twice: on the config before data preparation (cheap, fails
    fast), then on the model config and tokenizer, known once the data is ready."""
    old_cfg = ckpt.get("config", {})
    diffs = [f"{k} {old_cfg[k]!r} -> {v!r}" for k, v in cfg.items()
             if k in old_cfg and k not in resumable and k not in ModelConfig.__dataclass_fields__
             and old_cfg[k] != v]
    if mcfg is not None:  # the model's shape: what the preset and the data made of the config
        diffs += [f"{k} {old!r} -> {mcfg.__dict__[k]!r}" for k, old in ckpt["model_config"].items()
                  if mcfg.__dict__.get(k) != old and k != "attn_impl"]  # attn_impl: how, not what
    if tok is not None and isinstance(ckpt.get("tokenizer"), dict) and ckpt["tokenizer"] != tok.state():
        diffs.append("tokenizer (the dataset was prepared with another one)")
    if diffs:
        raise ValueError(f"cannot resume {cfg['out_dir']}: {', '.join(diffs)} differ from the "
                         "checkpoint; resume with its config, or start anew with another --out_dir")


def run_main(script, defaults, train, argv, elsewhere=None):
    """A training stage's command line: `python SCRIPT config/FILE.py [--key=value ...]`.

    Every key of `defaults` can come from the file or the command line;
    load_config prints the result, so each log starts with exactly what ran.
    Bad input ends in one line naming the problem; under torchrun every process
    leaves in order. elsewhere: {method: script} of the methods another script
    trains (`python align.py config/ppo.py` names rl.py), read from the config's
    `method = "..."` line or a later --method=.
    """
    import re
    import sys
    import traceback

    import torch.distributed as dist

    if not argv or argv[0].startswith("--"):
        sys.exit(f"usage: python {script} config/FILE.py [--key=value ...]")
    text = "\n".join([Path(argv[0]).read_text() if Path(argv[0]).is_file() else ""] + argv[1:])
    said = re.findall(r"^(?:--)?method\s*=\s*[\"']?(\w+)", text, re.M)
    if said and said[-1] in (elsewhere or {}):
        sys.exit(f"method {said[-1]!r} is trained by {elsewhere[said[-1]]}: python {elsewhere[said[-1]]} "
                 + " ".join(argv))
    try:
        result = train(load_config(argv[0], defaults, argv[1:]))
    except (ValueError, FileNotFoundError, FloatingPointError) as e:  # bad input: the message is the help
        print(f"{script}: {e}", file=sys.stderr)
        shutdown(1) if dist.is_initialized() else sys.exit(1)
    except BaseException:
        if dist.is_initialized():
            traceback.print_exc()
            shutdown(1)
        raise
    val = result.get("val_loss")  # align.py's methods report their own held-out numbers instead
    print(f"done: step {result['step']}" + (f", val loss {val:.4f}" if val is not None else ""))
    if dist.is_initialized():
        shutdown(0)
    return result


def shutdown(code):
    """Leave a torchrun process. subtle: with torch 2.13 on CPU, gloo sometimes aborts
    (SIGABRT in a destructor at interpreter exit) after a run that finished correctly.
    An orderly teardown, flushed output, then os._exit skips those destructors."""
    import sys

    import torch.distributed as dist

    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
#< L08
#> L09 load-run


def model_from_checkpoint(path, device="cpu", ckpt=None, head=None):
    """(model, checkpoint dict) from a pretrain.py run folder or ckpt.pt file
    (or from `ckpt`, that file already loaded: a big one is read only once).
    head(model, ckpt): wraps the fresh model before its weights load -- lesson 12's
    reward model, whose head scores instead of predicting tokens."""
    path = Path(path)
    if ckpt is None:
        ckpt = load_checkpoint(path / "ckpt.pt" if path.is_dir() else path, map_location=device)
    if "model_config" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{path} is not a checkpoint written by pretrain.py or sft.py")
    #> L12 not-a-generator
    if ckpt.get("scalar_head") and head is None:  # its head scores text instead of predicting tokens
        raise ValueError(f"{path} is a reward model (align.py config/reward.py), not a model that "
                         "writes text: PPO reads it through --reward_init; chat with or tune the "
                         "model it was trained from (out/sft)")
    #< L12
    model = CausalLM(ModelConfig(**ckpt["model_config"]))
    model = head(model, ckpt) if head else model
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


def load_run(path, device="cpu", dtype=None):
    """(model, tokenizer, checkpoint) from a run folder or a ckpt.pt, wherever it was
    copied: the checkpoint carries its tokenizer's state. Checkpoints written before
    that stored the tokenizer file's path instead, which still works while the file is
    there. dtype: cast the weights (torch.bfloat16 halves memory for inference)."""
    #> L10 hf-run
    if hf.is_hf_folder(path):  # a downloaded Hugging Face model: its folder is the checkpoint
        return hf.load_hf_run(path, device, dtype)
    #< L10
    ckpt = load_checkpoint(Path(path) / "ckpt.pt" if Path(path).is_dir() else path, device)
    #> L14 lora-run
    if "lora" in ckpt:  # a LoRA run holds its adapter alone: rebuild its base, then attach
        if not Path(ckpt["lora"]["base"]).exists():
            raise FileNotFoundError(f"{path} is a LoRA run: it holds only the adapter, and its base "
                                    f"checkpoint {ckpt['lora']['base']} is missing; copy the base there")
        model, tok, _ = load_run(ckpt["lora"]["base"], device, dtype)
        return attach_adapter(model, ckpt), tok, ckpt
    #< L14
    model, ckpt = model_from_checkpoint(path, device, ckpt)
    source = ckpt.get("tokenizer")
    if source is None or (isinstance(source, str) and not Path(source).exists()):
        raise FileNotFoundError(f"{path} has no tokenizer (an old checkpoint whose tokenizer file "
                                f"{source} is gone): prepare the same dataset again, or retrain")
    return model.to(dtype) if dtype else model, load_tokenizer(source), ckpt


def token_logprobs(logits, targets):
    """log p(target) at every position: logits (B, T, V), targets (B, T) -> (B, T), fp32.

    Targets equal to -1 (padding, prompts) give 0, so a masked sum needs no second
    mask. eval.py's perplexity sums these; align.py and rl.py read the log-probs of
    answers from them (with gradients: see align.next_token_logprobs).
    subtle: log_softmax in fp32. In bf16 a log-probability of -0.01 has ~2 significant
    digits, and perplexity or DPO add up hundreds of them.
    """
    logp = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    return logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) * (targets != -1)


def decode_stream(tok, tokens, stop_ids=()):
    """Yield text pieces as token ids arrive (chat.py prints them as they come).

    subtle: a BPE token can end in the middle of a UTF-8 character, so one
    token's bytes may not decode alone. We decode everything so far and hold
    the text back while its tail is incomplete (U+FFFD), yielding only the new
    part. Stops at the first id in stop_ids (not yielded); a character still
    incomplete at the end comes out as U+FFFD rather than vanishing. An id past
    the vocabulary has no text and shows as nothing, as in `tokenizers`: Qwen3
    pads its embedding to 151,936 rows for 151,669 tokens, and an untrained or
    hot-sampled model can pick a padding row.
    >>> tok = BPETokenizer()  # bytes only: "é" is two tokens, 0xC3 0xA9
    >>> list(decode_stream(tok, [104, 0xC3, 0xA9, 33, 0, 104], stop_ids={0}))
    ['h', 'é', '!']
    >>> list(decode_stream(tok, [104, 0xC3]))
    ['h', '�']
    >>> list(decode_stream(tok, [104, 300, 105]))
    ['h', 'i']
    """
    new, shown = [], 0
    for t in tokens:
        t = int(t)  # a 0-d or one-element tensor from model.stream, or an int
        if t in stop_ids:
            break
        if t >= tok.vocab_size:
            continue
        new.append(t)
        text = tok.decode(new)
        if not text.endswith("\ufffd"):
            yield text[shown:]
            shown = len(text)
    if tail := tok.decode(new)[shown:]:  # bytes that never completed a character: show them
        yield tail


def stream_text(model, tok, ids, max_new_tokens, eos_id=None, stop_ids=(), temperature=0.0,
                top_k=None, top_p=None, generator=None):
    """Text pieces of the continuation of the prompt `ids`, yielded as tokens arrive.

    Positions past block_size were never trained: only the newest block_size tokens
    are kept. Generation stops at eos_id; the text stops at it or any of stop_ids
    (chat.py prints each piece at once; eval.py and exact match join them)."""
    prompt = torch.tensor([ids[-model.cfg.block_size:]], device=next(model.parameters()).device)
    tokens = model.stream(prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          eos_id=eos_id, generator=generator)
    return decode_stream(tok, tokens, stop_ids={eos_id, *stop_ids} - {None})
#< L09
#> L10 chat


# -----------------------------------------------------------------------------
# Chat plumbing: one reply through the template, and exact match with its error bar


def chat_stream(model, tok, messages, max_new_tokens=32, temperature=0.0, top_k=None, top_p=None,
                generator=None):
    """The assistant's reply to `messages` (ending with a user turn), as text pieces
    while the tokens arrive (chat.py prints them as they come).

    Renders the conversation for completion (it ends with <|assistant_start|>)
    and stops at <|assistant_end|>: the end token the model was trained to
    produce is what makes a chat model stop talking. (A real model's template,
    hf.CHAT_FORMATS, has its own: <|im_end|> for Qwen3, <|eot_id|> for Llama 3.)
    """
    ids, _ = tok.render_conversation(messages, for_completion=True)
    # A base model never learned the end of a turn; its end of a document ends the reply too.
    docs = [tok.special_tokens.get(t) for t in ("<|endoftext|>", "<|end_of_text|>")]
    return stream_text(model, tok, ids, max_new_tokens, tok.special_tokens[tok.template_end], docs,
                       temperature, top_k, top_p, generator)


def chat_reply(model, tok, messages, max_new_tokens=32, temperature=0.0, generator=None):
    """The whole reply as one string (greedy by default): what evaluations compare."""
    return "".join(chat_stream(model, tok, messages, max_new_tokens, temperature, generator=generator))


def wilson_interval(right, n, z=1.96):
    """95% confidence interval of an accuracy right/n (Wilson 1927).

    The textbook p +- z sqrt(p(1-p)/n) collapses to zero width at p = 0 or 1
    and leaves [0, 1]; Wilson's interval inverts the normal test instead:
        center = (p + z^2/2n) / (1 + z^2/n)
        half   = z / (1 + z^2/n) * sqrt(p(1-p)/n + z^2/4n^2)
    >>> [round(x, 3) for x in wilson_interval(8, 10)]
    [0.49, 0.943]
    """
    if n == 0:
        return 0.0, 1.0
    p, zz = right / n, z * z / n
    center = (p + zz / 2) / (1 + zz)
    half = z / (1 + zz) * math.sqrt(p * (1 - p) / n + zz / (4 * n))
    return max(0.0, center - half), min(1.0, center + half)


def chat_exact_match(model, tok, examples, max_new_tokens=16, progress=None):
    """Greedy replies to each example's prompt, compared with its reference answer.

    examples: message lists whose last message is the reference (assistant)
    answer; the prompt is everything before it. Compared after stripping spaces
    and case. Returns {accuracy, ci_low, ci_high (Wilson 95%), n, right, wrong,
    replies}: right/wrong are the examples themselves, replies the model's
    answers in the order of `examples`.
    """
    right, wrong, replies = [], [], []
    for i, chat in enumerate(examples):
        reply = chat_reply(model, tok, chat[:-1], max_new_tokens)
        replies.append(reply)
        ok = reply.strip().lower() == chat[-1]["content"].strip().lower()
        (right if ok else wrong).append(chat)
        if progress:
            progress(i + 1, len(examples))
    n = len(examples)
    low, high = wilson_interval(len(right), n)
    return {"accuracy": len(right) / max(n, 1), "ci_low": low, "ci_high": high, "n": n,
            "right": right, "wrong": wrong, "replies": replies}


def exact_match_line(name, r):
    """The line every stage prints for a chat_exact_match result (or its summary dict)."""
    return (f"exact match {name}: {r['accuracy']:.1%} (95% CI {r['ci_low']:.1%}-{r['ci_high']:.1%}, "
            f"n={r['n']})")
#< L10
#> L14 lora-runs


# -----------------------------------------------------------------------------
# LoRA runs (lesson 14): a checkpoint that holds the adapter alone and names its base


def apply_adapter(model, settings):
    """apply_lora or apply_qlora as `settings` (a LoRA run's checkpoint["lora"]) say."""
    targets = settings["targets"]
    targets = targets if targets == "all-linear" else targets.split(",")  # "q_proj,v_proj"
    wrap = peft.apply_qlora if settings["qlora"] else peft.apply_lora
    wrap(model, settings["r"], settings["alpha"], targets)
    if settings.get("tokens"):  # token ids whose embedding rows train too
        peft.train_token_rows(model, settings["tokens"])
    return model


def adapter_checkpoint(model, settings, base):
    """The parts of a checkpoint that make it a LoRA run's: its weights are the A, B
    pairs alone (KBs, not MBs), and it names the base checkpoint and its SHA-256."""
    base = hf.checkpoint_file(base).resolve()
    return {"model": peft.lora_state_dict(model),
            "lora": {**settings, "base": str(base), "base_sha256": hf.file_sha256(base)}}


def attach_adapter(model, ckpt):
    """Wrap the base `model` as a LoRA run's checkpoint says and load its A, B pairs;
    refuses a base whose bytes changed since (the adapter would be meaningless)."""
    settings = ckpt["lora"]
    if hf.file_sha256(settings["base"]) != settings["base_sha256"]:
        raise ValueError(f"the base checkpoint {settings['base']} changed since this adapter was "
                         "trained (SHA-256 differs); restore that base or retrain the adapter")
    apply_adapter(model, settings)
    missing = sorted(set(peft.lora_state_dict(model)) - set(ckpt["model"]))
    unexpected = model.load_state_dict(ckpt["model"], strict=False).unexpected_keys
    if missing or unexpected:
        raise ValueError(f"the adapter does not fit the model: {(missing or unexpected)[:3]}")
    return model


# The keys of every stage that can train an adapter (sft.py, align.py, rl.py)
LORA_DEFAULTS = dict(
    lora_rank=0,  # LoRA rank r; 0: fine-tune every weight
    lora_alpha=16.0,  # the update is (lora_alpha / lora_rank) B A
    lora_targets="all-linear",  # or comma-separated layer names: "q_proj,v_proj"
)
#< L14
