#> L06 data
"""
pretrain.py -- train a language model from scratch on next-token prediction.

    python pretrain.py config/tiny.py                 # ~1M params, story world, minutes on a CPU
    python pretrain.py config/tiny.py --max_iters=100 --batch_size=4   # any key can be overridden
    python pretrain.py config/tiny.py --resume        # continue from out_dir/ckpt.pt
    torchrun --nproc_per_node=8 pretrain.py config/gpt2.py   # data-parallel on 8 GPUs

The chapter in three parts. Lesson 06: token files on disk, read as random
windows. Lesson 07: the loss, two optimizers written out (AdamW, Lion) and the
learning-rate schedule. Lesson 08: the loop -- gradient accumulation, mixed
precision, torch.compile, DistributedDataParallel, logging, and checkpoints
that resume bit for bit.
"""

import json
import math
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from model import CausalLM, ModelConfig, preset
from run import load_tokenizer


# -----------------------------------------------------------------------------
# Config: every key a run can set, with its default. A config file or
# --key=value overrides these; anything else is an error that lists them.

DEFAULTS = dict(
    dataset="storyworld",  # a folder under data/ made by data/prepare.py
    data_dir="data",
    out_dir="out/tiny",
    model="tiny",  # a preset of model.py; the ModelConfig keys below override it
    batch_size=8,  # sequences per micro-batch
    seed=1337,
    **{k: None for k in ModelConfig.__dataclass_fields__ if k != "vocab_size"},
)
#< L06
#> L07 config
DEFAULTS.update(
    max_iters=2000,
    optimizer="adamw",  # or "lion"
    lr=1e-3,  # peak learning rate
    min_lr=1e-4,  # cosine decays to this (~lr/10, Chinchilla)
    warmup_iters=100,
    weight_decay=0.1,
    beta1=0.9,
    beta2=0.95,
    grad_clip=1.0,  # max global gradient norm; 0 disables
)
#< L07
#> L08 config
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

# The loop's plumbing (lesson 07's lr schedule and clipping included) lives in run.py:
# sft.py, align.py and rl.py run the same loop.
from run import (RESUMABLE, RUN_DEFAULTS, check_resume, get_lr, load_checkpoint, logged, optimizer_step,
                 plot_log, progress_line, resume_training, run_main, save_checkpoint, start_run,
                 training_state)

DEFAULTS.update(
    grad_accum=1,  # micro-batches per optimizer step (per process)
    **RUN_DEFAULTS,  # device ("auto": cuda > mps > cpu), dtype ("auto": bf16 where native), resume
    compile=None,  # True: torch.compile the model; "auto": only where it can run; None/False: not
    eval_interval=250,
    eval_iters=20,
    log_interval=25,
    sample_tokens=120,  # length of the sample printed at each eval
    peak_flops=0.0,  # hardware peak FLOP/s for MFU (e.g. 312e12 for an A100 in bf16); 0: skip
    plot=False,
)
#< L08
#> L06 data


# -----------------------------------------------------------------------------
# Data: token files on disk, read as random windows


def ensure_data(cfg):
    """The dataset folder, prepared by data/prepare.py on first use (a subprocess, so this
    file imports nothing of the project but model and tokenizer)."""
    folder = Path(cfg["data_dir"], cfg["dataset"])
    if not (folder / "meta.json").exists():
        print(f"{folder} is missing: preparing it with data/prepare.py (once)")
        script = Path(__file__).resolve().parent / "data" / "prepare.py"
        if subprocess.run([sys.executable, str(script), cfg["dataset"], "--out", str(folder)]).returncode:
            raise FileNotFoundError(f"{folder} could not be prepared (the reason is above); with the text at "
                                    f"hand: python data/prepare.py {cfg['dataset']} --source FILE --out {folder}")
    return folder, json.loads((folder / "meta.json").read_text())


class Batches:
    """Random (x, y) windows of a uint16 token file, y = x shifted by one.

    np.memmap maps the file instead of reading it: the OS pages in only the
    windows we touch, so a corpus larger than RAM works. Batch number i is a
    pure function of (seed, i): resuming needs only the counter, and with
    several processes each takes its own numbers, with no overlap.
    """

    def __init__(self, path, block_size, batch_size, seed, device="cpu"):
        self.data = np.memmap(path, dtype=np.uint16, mode="r")
        if len(self.data) < block_size + 1:
            raise ValueError(f"{path} holds {len(self.data)} tokens, fewer than block_size + 1 = "
                             f"{block_size + 1}; use a smaller block_size or more data")
        self.block_size, self.batch_size, self.seed = block_size, batch_size, seed
        self.device = torch.device(device)

    #> L06 batches exercise
    def get(self, i):
        """Batch number i: x (B, T) int64 token windows and y, the same windows shifted
        left by one, on self.device. The same i always gives the same batch."""
        # A generator seeded by (seed, i) draws batch i's window starts: no state to save,
        # and process r of w taking numbers r, r + w, ... never repeats another's batches.
        rng = np.random.default_rng([self.seed, i])
        starts = rng.integers(0, len(self.data) - self.block_size, size=self.batch_size)
        # T + 1 tokens per window: T inputs, and the same T shifted by one as targets.
        # int64 because nn.Embedding and cross_entropy index with longs, not uint16.
        window = np.stack([self.data[s:s + self.block_size + 1] for s in starts]).astype(np.int64)
        xy = torch.from_numpy(window)  # (B, T + 1)
        if self.device.type == "cuda":  # pinned memory lets the copy overlap with compute
            xy = xy.pin_memory().to(self.device, non_blocking=True)
        return xy[:, :-1], xy[:, 1:]  # x (B, T), y (B, T)
    #< L06
#< L06
#> L07 optim


# -----------------------------------------------------------------------------
# The loss


#> L07 loss exercise
def cross_entropy(logits, targets, ignore_index=-1):
    """Mean negative log-likelihood of the targets, written out.

    softmax turns logits z into probabilities p_i = e^{z_i} / sum_j e^{z_j}, so
    -log p_target = logsumexp(z) - z_target. logsumexp subtracts max(z) first:
    e^{z} of large logits would overflow. logits (N, V), targets (N,).
    >>> round(cross_entropy(torch.zeros(1, 4), torch.tensor([2])).item(), 4)  # uniform: ln 4
    1.3863
    """
    keep = targets != ignore_index
    z, t = logits[keep].float(), targets[keep]
    return (torch.logsumexp(z, dim=-1) - z.gather(-1, t[:, None]).squeeze(-1)).mean()
#< L07


# -----------------------------------------------------------------------------
# Optimizers, written out


def param_groups(model, weight_decay):
    """Decay matrices (>= 2-D: Linear, Embedding weights), not biases or norm gains:
    shrinking a gain or a bias towards 0 only fights what they are for."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


class AdamW(torch.optim.Optimizer):
    """Adam with decoupled weight decay (Kingma & Ba 2015; Loshchilov & Hutter 2019).

    Per parameter p with gradient g, at step t:
        m = b1 m + (1 - b1) g            running mean of gradients
        v = b2 v + (1 - b2) g^2          running mean of squared gradients
        p = p - lr wd p                  decay, decoupled from the gradient
        p = p - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    The bias corrections undo the zero init of m and v. Each update is about
    lr in size whatever the gradient's scale. The ops run over all tensors of
    a group at once (torch._foreach_*): one kernel launch per op, not per tensor.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    #> L07 adamw-step exercise
    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if not self.state[p]:
                    self.state[p] = {"step": torch.tensor(0.0), "m": torch.zeros_like(p),
                                     "v": torch.zeros_like(p)}
            (b1, b2), lr, eps = group["betas"], group["lr"], group["eps"]
            grads = [p.grad for p in params]
            m = [self.state[p]["m"] for p in params]
            v = [self.state[p]["v"] for p in params]
            step = self.state[params[0]]["step"] + 1  # all tensors of a group step together
            for p in params:
                self.state[p]["step"] = step
            t = step.item()
            torch._foreach_lerp_(m, grads, 1 - b1)  # m + (1-b1)(g - m) = b1 m + (1-b1) g
            torch._foreach_mul_(v, b2)
            torch._foreach_addcmul_(v, grads, grads, value=1 - b2)
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, math.sqrt(1 - b2 ** t))
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(params, m, denom, value=-lr / (1 - b1 ** t))
    #< L07

class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"):
        u = sign(b1 m + (1 - b1) g)      every coordinate moves by exactly lr
        p = p - lr (u + wd p)
        m = b2 m + (1 - b2) g
    One state tensor instead of Adam's two. The sign makes updates larger than
    Adam's, so use a ~3-10x smaller lr and a larger weight decay.
    """

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    #> L07 lion-step exercise
    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            (b1, b2), lr = group["betas"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = self.state[p].setdefault("m", torch.zeros_like(p))
                update = (b1 * m + (1 - b1) * p.grad).sign_()
                p.mul_(1 - lr * group["weight_decay"]).add_(update, alpha=-lr)
                m.lerp_(p.grad, 1 - b2)
    #< L07

def make_optimizer(model, cfg):
    # The two optimizers take the same groups and betas; Lion ignores Adam's eps and
    # needs its own lr (set it in the config: ~3-10x below AdamW's).
    groups = param_groups(model, cfg["weight_decay"])
    if cfg["optimizer"] == "lion":
        return Lion(groups, lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]))
    if cfg["optimizer"] == "adamw":
        return AdamW(groups, lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]))
    raise ValueError(f"unknown optimizer {cfg['optimizer']!r}; choose adamw or lion")


#< L07
#> L08 loop


# -----------------------------------------------------------------------------
# The training loop


def build_model(cfg, meta):
    """The preset, with every ModelConfig key the config sets, sized to the tokenizer."""
    # Keys left at None in the config mean "the preset's value"; vocab_size always comes
    # from the data, so the embedding has exactly one row per token the tokenizer makes.
    chosen = {k: v for k, v in cfg.items() if k in ModelConfig.__dataclass_fields__ and v is not None}
    return preset(cfg["model"], **{**chosen, "vocab_size": meta["vocab_size"]})


def compile_model(model, mode, device, log=print):
    """torch.compile(model) if mode is True; with "auto" only after a probe compiles, else
    the model unchanged and a one-line note; with None or False the model unchanged.

    Compiling traces forward and backward into fused kernels: a slow first step (~20 s
    on a CPU core), then elementwise chains (norms, SwiGLU, the optimizer's inputs) run as
    one loop each. On a CPU, Inductor writes C++ and needs a compiler, which many laptops
    lack; a one-line function finds that out in seconds, before the real model fails.
    """
    if mode not in (None, False, True, "auto"):
        raise ValueError(f"compile={mode!r}: use True, False or 'auto'")
    if mode == "auto":
        try:
            torch.compile(lambda t: t * 2 + 1)(torch.ones(4, device=device))
        except Exception as e:  # no C++ compiler, a broken toolchain, an unsupported platform
            log(f"compile: off, running eager ({type(e).__name__}: {str(e).strip().splitlines()[0][:100]})")
            return model
    if mode:
        log("compile: on (the first step traces and compiles the model)")
        return torch.compile(model)
    return model


@torch.no_grad()
def estimate_loss(model, batches, iters, autocast):
    """Mean loss over the same `iters` batches every time, so evals compare."""
    # eval mode turns dropout off: we measure the model, not a noisy version of it.
    # The batches are numbered 0..iters-1 of the val stream every time, so two evals
    # differ only because the model did.
    model.eval()
    losses = []
    for i in range(iters):
        x, y = batches.get(i)
        with autocast:
            losses.append(model(x, y)[1].item())
    model.train()
    return sum(losses) / len(losses)


# Keys a resumed run may change: run.RESUMABLE's (the schedule's tail, the remedies after
# a spike, what is printed, how it runs) and these. The rest (model shape, data, batch,
# seed, optimizer kind and betas, weight decay) define what the checkpoint was trained on.
RESUMABLE = RESUMABLE | {
    "sample_tokens", "plot", "peak_flops",  # what is printed and measured
    "data_dir",  # where the (same) dataset lives now; the tokenizer check catches another one
}


def train(cfg):
    """Run one training job; returns the final {"step", "train_loss", "val_loss"}."""
    # autocast runs matmuls in bf16/fp16 and keeps precision-sensitive ops (softmax, norms,
    # the loss) in fp32; the weights and the optimizer stay fp32 throughout. With fp16 the
    # scaler multiplies the loss so small gradients do not underflow (run.setup_precision).
    ddp, rank, world, device, log, autocast, scaler = start_run(cfg)
    master = rank == 0  # only one process prints, samples and writes files

    out = Path(cfg["out_dir"])
    ckpt_path, step = out / "ckpt.pt", 0
    ckpt = load_checkpoint(ckpt_path, map_location=device) if cfg["resume"] else None  # fail fast
    if ckpt:
        check_resume(ckpt, cfg, RESUMABLE)
    folder, meta = ensure_data(cfg)
    mcfg = build_model(cfg, meta)
    tok = load_tokenizer(folder / meta["tokenizer"])
    if ckpt:
        check_resume(ckpt, cfg, RESUMABLE, mcfg, tok)
    torch.manual_seed(cfg["seed"])  # the same init on every rank (DDP also broadcasts rank 0's)
    model = CausalLM(mcfg).to(device)
    optimizer = make_optimizer(model, cfg)
    if ckpt:
        # Weights, Adam's moments (without them: a jolt), the step (the lr schedule's
        # position and the next batch number) and the RNG (dropout continues as if never
        # stopped): everything that shapes the next step comes back, so the run continues
        # exactly as if it had never stopped (a test compares the two).
        step = resume_training(ckpt, model, optimizer)
        log(f"resumed from {ckpt_path} at step {step}")
    raw = model  # checkpoints store the plain module, not the compiled or DDP wrapper
    model = compile_model(model, cfg["compile"], device, log)
    if ddp:
        model = DDP(model, device_ids=[device] if device.type == "cuda" else None)
    train_batches = Batches(folder / "train.bin", mcfg.block_size, cfg["batch_size"], cfg["seed"], device)
    val_batches = Batches(folder / "val.bin", mcfg.block_size, cfg["batch_size"], cfg["seed"] + 1, device)
    # One optimizer step sees batch_size x block_size tokens per micro-batch, grad_accum
    # micro-batches per process, and world processes: the throughput in the log counts all.
    tokens_per_step = cfg["batch_size"] * mcfg.block_size * cfg["grad_accum"] * world
    log(f"model: {raw.num_params():,} parameters; {tokens_per_step:,} tokens per step; "
        f"{meta['train_tokens']:,} training tokens")

    def checkpoint():
        if master:
            save_checkpoint(ckpt_path, training_state(raw, optimizer, step, cfg, tok, data=str(folder)))

    history, t0, t_start, step0 = {}, time.time(), time.time(), step
    # Ctrl-C inside: keep what was learned (a checkpoint), exit cleanly (run.logged).
    with logged(out, master, log, checkpoint, lambda: step) as run_log:
        while step < cfg["max_iters"]:
            lr = get_lr(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # One optimizer step = grad_accum micro-batches per process x world processes.
            # Gradients add up across backward() calls, so each micro-loss is divided by
            # grad_accum: the sum is the gradient of the mean loss over the whole step.
            loss = torch.zeros((), device=device)  # this step's mean loss, for the log
            for micro in range(cfg["grad_accum"]):
                x, y = train_batches.get((step * world + rank) * cfg["grad_accum"] + micro)
                last = micro == cfg["grad_accum"] - 1  # DDP: all-reduce only on the last micro-batch
                with model.no_sync() if ddp and not last else nullcontext(), autocast:
                    _, micro_loss = model(x, y)
                    scaler.scale(micro_loss / cfg["grad_accum"]).backward()
                loss += micro_loss.detach() / cfg["grad_accum"]
            if ddp:  # the loss of the whole step, not just this rank's share (for logs)
                dist.all_reduce(loss)  # a sum (gloo has no AVG): divide by the process count
                loss /= world
            # run.optimizer_step, shared with sft.py, align.py and rl.py: stop on a NaN/inf loss
            # before it reaches a checkpoint, unscale (fp16), clip the global gradient norm
            # (lesson 07), step, and free the gradients (set to None, not zeroed).
            norm = optimizer_step(raw, optimizer, scaler, loss, cfg["grad_clip"], step, ckpt_path)
            step += 1
            if step % cfg["log_interval"] == 0 or step == cfg["max_iters"]:
                dt = (time.time() - t0) / cfg["log_interval"]  # includes any eval in the interval
                t0 = time.time()
                rate = tokens_per_step / dt
                # The ETA uses the mean step time since this process started, not the last
                # interval's: an eval or a sample inside one interval would make it jump.
                eta = (cfg["max_iters"] - step) * (time.time() - t_start) / (step - step0)
                # MFU: model FLOPs actually done per second over the hardware's peak (PaLM,
                # Chowdhery et al. 2022, app. B); only when the config states that peak.
                mfu = f" mfu {raw.mfu(rate, cfg['peak_flops']):.1%}" if cfg["peak_flops"] else ""
                log(progress_line(step, cfg["max_iters"], loss.item(), lr, norm.item(), dt, rate, eta, mfu))
                history = {"step": step, "tokens": step * tokens_per_step, "train_loss": loss.item(),
                           "lr": lr, "grad_norm": norm.item(), "ms_per_step": dt * 1000, "tok_per_s": rate}
            if step % cfg["eval_interval"] == 0 or step == cfg["max_iters"]:
                history = {**history, "step": step, "tokens": step * tokens_per_step,
                           "val_loss": estimate_loss(raw, val_batches, cfg["eval_iters"], autocast)}
                if master:
                    log(f"step {step}: val loss {history['val_loss']:.4f}\n--- sample ---\n"
                        f"{sample_text(raw, tok, meta, cfg, device)}\n--------------")
                # A checkpoint at every eval: a crash or a pre-empted machine loses at most
                # eval_interval steps, and the file is written atomically (run.save_checkpoint).
                checkpoint()
            if history.get("step") == step:  # one JSON line per logged step
                run_log.write(history)
    if master and (cfg["plot"] or step == cfg["max_iters"]):
        # Against tokens, not steps: runs with different batch sizes then share an x axis.
        plot_log(out, [["train_loss", "val_loss"]], x="tokens", xlabel="tokens seen",
                 ylabel="loss (nats per token)")
    return {"step": step, "train_loss": history.get("train_loss"), "val_loss": history.get("val_loss")}


def sample_text(model, tok, meta, cfg, device):
    """A short sample from the start of a document, with a fixed seed: the same noise
    at every eval, so the samples show what changed in the model, not in the dice."""
    start = "Once" if meta["tokenizer_kind"] == "bpe" else "\n"
    gen = torch.Generator(device).manual_seed(cfg["seed"])
    ids = model.generate(torch.tensor([tok.encode(start)], device=device), cfg["sample_tokens"],
                         temperature=0.8, top_k=50, eos_id=meta.get("eot_id"), generator=gen)
    model.train()  # generate() switched to eval mode
    return tok.decode(ids[0].tolist())


if __name__ == "__main__":
    run_main("pretrain.py", DEFAULTS, train, sys.argv[1:])
#< L08
