#> L06 run
"""
run.py -- what every stage's run needs, written once.

pretrain.py, sft.py, align.py and rl.py each teach their own loop; what those
loops have in common lives here, so a stage file shows only what is new in it:

  lesson 06  load_config: `name = value` config files and --key=value overrides
  lesson 07  get_lr (warmup + cosine) and clip_grad_norm
  lesson 08  device and precision, atomic checkpoints and exact resume, the
             optimizer step with its guards, the progress line, run_main
  lesson 09  load_run: a model and its tokenizer from any run folder
  lesson 10  replies through the chat template, exact match with its Wilson
             interval

    from run import load_run
    model, tok, ckpt = load_run("out/sft")   # a run folder, a ckpt.pt or a HF folder
"""

import math
import os
from pathlib import Path

import torch

from model import CausalLM, ModelConfig
from tokenizer import load_tokenizer

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
#> L10 built-in-data


def refresh_data_on_rank0(cfg, ddp, master):
    """Under torchrun, rank 0 makes the built-in chat sets (or remakes stale ones:
    tokenizer.refresh_built_in) of every *.jsonl path in cfg while the other ranks wait.
    Every rank writing the same files at once could hand a reader half a file."""
    import torch.distributed as dist
    from tokenizer import refresh_built_in

    if ddp:
        if master:
            for path in [v for v in cfg.values() if isinstance(v, str) and v.endswith(".jsonl")]:
                refresh_built_in(Path(path).parent)
        dist.barrier()
#< L10


def setup_precision(device, requested="auto"):
    """(autocast, scaler, why) for choose_dtype's choice. autocast runs matmuls in
    bf16/fp16 and keeps precision-sensitive ops (softmax, norms, the loss) in fp32;
    the weights and the optimizer stay fp32 throughout. The GradScaler is a no-op
    unless fp16, whose small range needs the loss scaled up before backward."""
    from contextlib import nullcontext

    dtype, why = choose_dtype(device, requested)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    return autocast, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16), why


def optimizer_step(model, optimizer, scaler, loss, grad_clip, step, ckpt_path):
    """After backward: refuse a non-finite loss, clip, step, clear. Returns the gradient
    norm before clipping."""
    if not math.isfinite(loss.item()):  # stop before a NaN reaches a checkpoint
        raise FloatingPointError(f"loss is {loss.item()} at step {step}: training diverged. "
                                 f"The last good checkpoint stays at {ckpt_path}; try a lower lr")
    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    norm = clip_grad_norm(model.parameters(), grad_clip)
    scaler.step(optimizer)  # with fp16: skipped if the scaled gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)  # None, not zeros: frees memory, skips a fill
    return norm


def progress_line(step, max_iters, loss, lr, norm, dt, rate, eta, extra=""):
    """The log line: dt seconds per step, rate tokens/s, eta seconds left."""
    return (f"step {step}/{max_iters}  loss {loss:.4f}  lr {lr:.2e}  grad norm {norm:.2f}  "
            f"{dt * 1000:.0f} ms/step  {rate:,.0f} tok/s{extra}  ETA {eta / 60:.1f} min")


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


def run_main(script, defaults, train, argv):
    """A training stage's command line: `python SCRIPT config/FILE.py [--key=value ...]`.

    Every key of `defaults` can come from the file or the command line;
    load_config prints the result, so each log starts with exactly what ran.
    Bad input ends in one line naming the problem; under torchrun every process
    leaves in order.
    """
    import sys
    import traceback

    import torch.distributed as dist

    if not argv or argv[0].startswith("--"):
        sys.exit(f"usage: python {script} config/FILE.py [--key=value ...]")
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


def model_from_checkpoint(path, device="cpu", ckpt=None):
    """(model, checkpoint dict) from a pretrain.py run folder or ckpt.pt file
    (or from `ckpt`, that file already loaded: a big one is read only once)."""
    path = Path(path)
    if ckpt is None:
        ckpt = load_checkpoint(path / "ckpt.pt" if path.is_dir() else path, map_location=device)
    if "model_config" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{path} is not a checkpoint written by pretrain.py or sft.py")
    #> L12 not-a-generator
    if ckpt.get("scalar_head"):  # its head scores text instead of predicting tokens
        raise ValueError(f"{path} is a reward model (align.py config/reward.py), not a model that "
                         "writes text: PPO reads it through --reward_init; chat with or tune the "
                         "model it was trained from (out/sft)")
    #< L12
    model = CausalLM(ModelConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


def load_run(path, device="cpu", dtype=None):
    """(model, tokenizer, checkpoint) from a run folder or a ckpt.pt, wherever it was
    copied: the checkpoint carries its tokenizer's state. Checkpoints written before
    that stored the tokenizer file's path instead, which still works while the file is
    there. dtype: cast the weights (torch.bfloat16 halves memory for inference)."""
    #> L10 hf-run
    import hf  # here, not at the top: only this branch reads Hugging Face files

    if hf.is_hf_folder(path):  # a downloaded Hugging Face model: its folder is the checkpoint
        return hf.load_hf_run(path, device, dtype)
    #< L10
    ckpt = load_checkpoint(Path(path) / "ckpt.pt" if Path(path).is_dir() else path, device)
    #> L14 lora-run
    if "lora" in ckpt:  # a LoRA run holds its adapter alone: rebuild its base, then attach
        import peft  # here, not at the top: only a LoRA run needs it

        if not Path(ckpt["lora"]["base"]).exists():
            raise FileNotFoundError(f"{path} is a LoRA run: it holds only the adapter, and its base "
                                    f"checkpoint {ckpt['lora']['base']} is missing; copy the base there")
        model, tok, _ = load_run(ckpt["lora"]["base"], device, dtype)
        return peft.attach_adapter(model, ckpt), tok, ckpt
    #< L14
    model, ckpt = model_from_checkpoint(path, device, ckpt)
    source = ckpt.get("tokenizer")
    if source is None or (isinstance(source, str) and not Path(source).exists()):
        raise FileNotFoundError(f"{path} has no tokenizer (an old checkpoint whose tokenizer file "
                                f"{source} is gone): prepare the same dataset again, or retrain")
    return model.to(dtype) if dtype else model, load_tokenizer(source), ckpt
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
    tokenizer.CHAT_FORMATS, has its own: <|im_end|> for Qwen3, <|eot_id|> for Llama 3.)
    """
    from tokenizer import chat_end, decode_stream  # lesson 10's: imported where chat begins

    ids, _ = tok.render_conversation(messages, for_completion=True)
    end = tok.special_tokens[chat_end(tok)]
    prompt = torch.tensor([ids], device=next(model.parameters()).device)
    tokens = model.stream(prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          eos_id=end, generator=generator)
    # A base model never learned the end of a turn; its end of a document ends the reply too.
    ends = {end} | {tok.special_tokens.get(t) for t in ("<|endoftext|>", "<|end_of_text|>")}
    return decode_stream(tok, tokens, stop_ids=ends - {None})


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


def exact_match(model, tok, examples, max_new_tokens=16, progress=None):
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
#< L10
