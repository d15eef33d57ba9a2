#> L10 sft
"""
sft.py -- supervised fine-tuning: turn a base model into one that answers.

    python sft.py config/sft.py                   # from out/tiny, minutes on a CPU
    python sft.py config/sft.py --pack=True       # several conversations to a row
    python sft.py config/sft.py --resume          # continue out/sft/ckpt.pt exactly
    torchrun --nproc_per_node=2 sft.py config/sft.py

A base model continues text. A chat model continues text too -- a chat,
rendered with the template of tokenizer.render_conversation. SFT is therefore
pretraining's loss on different data (Ouyang et al. 2022, InstructGPT, step 1;
Wei et al. 2022, FLAN): the same next-token cross-entropy, computed only where
the assistant speaks (mask 1), so the model learns to produce answers rather
than to predict the questions it will be asked.

The chapter: conversations -> (ids, mask) -> batches, padded to the longest
conversation or packed several to a row (with attention kept inside each
conversation); exact match before and after on held-out stories; the loop,
with checkpoints and resume as in pretrain.py, whose plumbing it shares
through run.py.
"""

import json
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from data.chats import read_conversations, refresh_data_on_rank0
from run import (RESUMABLE, RUN_DEFAULTS, chat_exact_match, check_resume, exact_match_line, get_lr,
                 load_run, logged, optimizer_step, plot_log, progress_line,
                 resume_training, run_main, save_checkpoint, start_run, token_logprobs, training_state)
from tokenizer import CHAT_TOKENS
#> L14 import
import peft
from run import LORA_DEFAULTS, adapter_checkpoint, apply_adapter
#< L14

# -----------------------------------------------------------------------------
# Config: every key a run can set (see config/sft.py)

DEFAULTS = dict(
    init="out/tiny",  # the base run folder (or ckpt.pt, or a Hugging Face model folder) to start from
    data="data/sft/train.jsonl",  # chat JSONL (or Alpaca); made by `python data/prepare.py sft`
    val_data="data/sft/val.jsonl",  # held-out conversations for the validation loss
    eval_story="data/sft/eval_story.jsonl",  # held-out story questions, exact match
    eval_n=200,  # exact-match items per task, before and after (0: skip)
    out_dir="out/sft",
    batch_size=16,  # conversations per micro-batch
    pack=False,  # pack conversations into rows of block_size (same loss, less padding)
    max_iters=1000,
    lr=1e-3,
    min_lr=1e-4,
    warmup_iters=50,
    weight_decay=0.0,
    grad_clip=1.0,
    grad_accum=1,
    seed=1337,
    **RUN_DEFAULTS,  # device, dtype ("auto": bf16 where native), resume
    compile=False,
    eval_interval=250,
    eval_iters=10,  # validation batches per eval
    log_interval=50,
    #> L14 lora-config
    **LORA_DEFAULTS,  # lora_rank (0: fine-tune every weight), lora_alpha, lora_targets
    qlora=False,  # keep the frozen base in NF4 (needs lora_rank > 0)
    lora_tokens="chat",  # embedding rows that train beside LoRA: "chat" (new to the base), "all", "none"
    task="story",  # the eval.py task the run is measured on (config/lora.py: "which")
    eval_which="data/sft/eval_which.jsonl",  # lesson 14's adaptation task, held out
    #< L14
)
# Keys a resumed run may change: run.RESUMABLE's (the schedule's tail, what is printed, how
# it runs) and what is evaluated. The rest define what the checkpoint was trained on.
RESUMABLE = RESUMABLE | {"eval_n", "eval_story"}

# -----------------------------------------------------------------------------
# Data: conversations -> (ids, mask) -> batches


def load_conversations(path, tok, block_size, log=print):
    """Every conversation of a chat JSONL file, rendered: [(ids, mask), ...].

    A conversation of n tokens trains on n - 1 (input, target) pairs, so it fits
    the model when n - 1 <= block_size; longer ones are dropped, and counted,
    rather than cut (a cut could remove the very answer we train on).
    """
    # The built-in data/sft is made on first use, like pretrain.py's corpus (read_conversations).
    rendered = read_conversations(path, tok)  # fails on the first bad line, naming it
    kept = [(ids, mask) for ids, mask in rendered if len(ids) - 1 <= block_size]
    if len(kept) < len(rendered):
        log(f"{path}: dropped {len(rendered) - len(kept)} of {len(rendered)} conversations "
            f"longer than block_size + 1 = {block_size + 1} tokens")
    if not kept:
        raise ValueError(f"{path}: no conversation fits block_size={block_size}")
    return kept


#> L10 batches exercise
def pad_batch(examples, pad_id=0):
    """Conversations -> x, y (B, T) with T the longest one's length - 1.

    Row r is conversation r shifted by one, as in pretraining: x = ids[:-1],
    y = ids[1:]. The loss mask goes into the targets: y = -1 wherever the
    token to predict is not the assistant's (mask 0), and on the padding, so
    cross_entropy(ignore_index=-1) averages over exactly the supervised tokens.
    The pad id itself never matters: pads sit right of the real tokens, which
    causal attention keeps from looking at them.

    >>> x, y = pad_batch([([1, 2, 3, 4], [0, 0, 1, 1]), ([5, 6], [0, 1])])
    >>> x.tolist(), y.tolist()
    ([[1, 2, 3], [5, 0, 0]], [[-1, 3, 4], [6, -1, -1]])
    """
    T = max(len(ids) for ids, _ in examples) - 1
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), -1, dtype=torch.long)
    for r, (ids, mask) in enumerate(examples):
        n = len(ids) - 1
        x[r, :n] = torch.tensor(ids[:-1])
        y[r, :n] = torch.tensor([t if m else -1 for t, m in zip(ids[1:], mask[1:])])
    return x, y


def pack_batch(examples, block_size, pad_id=0):
    """The same conversations packed into as few rows of <= block_size as fit:
    x, y (R, T) and segments (R, T), the conversation each position belongs to
    (-1: padding at a row's end).

    Rows are filled first-fit, longest conversation first. The model restarts
    positions at each conversation and lets a token attend only within its own
    segment (model.packed_positions), so every logit -- and so the loss and its
    gradients -- equals pad_batch's; only the padding is gone.

    >>> x, y, seg = pack_batch([([1, 2, 3], [0, 1, 1]), ([4, 5], [0, 1])], block_size=4)
    >>> x.tolist(), y.tolist(), seg.tolist()
    ([[1, 2, 4]], [[2, 3, 5]], [[0, 0, 1]])
    """
    rows = []  # each a list of example indices, filled up to block_size positions
    # First-fit decreasing, the classic bin-packing heuristic (Johnson, 1973): placing the long
    # conversations first leaves gaps the short ones then fill, and it never needs more than
    # ~11/9 of the fewest rows possible. Optimal packing is NP-hard; this is a few lines.
    for k in sorted(range(len(examples)), key=lambda k: -len(examples[k][0])):
        n = len(examples[k][0]) - 1
        row = next((r for r in rows if sum(len(examples[j][0]) - 1 for j in r) + n <= block_size), None)
        if row is None:
            rows.append(row := [])
        row.append(k)
    # A tensor is rectangular: every row is as long as the fullest one, the rest is padding.
    T = max(sum(len(examples[j][0]) - 1 for j in r) for r in rows)
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), -1, dtype=torch.long)
    seg = torch.full((len(rows), T), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        t = 0
        for s, k in enumerate(row):
            xk, yk = pad_batch([examples[k]], pad_id)  # (1, n): the conversation alone
            n = xk.size(1)
            x[r, t:t + n], y[r, t:t + n], seg[r, t:t + n] = xk[0], yk[0], s
            t += n
    return x, y, seg
#< L10


class ChatBatches:
    """Batch i of a list of conversations, as a pure function of (seed, i).

    Epochs walk the data in a shuffled order, a new order each epoch; batch i
    takes conversations i*B .. i*B + B - 1 of that endless walk. No state, so a
    resumed run, or rank r of w taking batches r, r + w, ..., needs only i.
    """

    def __init__(self, examples, batch_size, seed, block_size, pack=False, device="cpu"):
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.block_size, self.pack, self.device = block_size, pack, torch.device(device)
        self._orders = {}

    def order(self, epoch):
        if epoch not in self._orders:  # keep only the latest epoch's: batches walk forward
            self._orders = {epoch: random.Random(f"{self.seed}-{epoch}").sample(
                range(len(self.examples)), len(self.examples))}
        return self._orders[epoch]

    def get(self, i):
        """(x, y, segments, n): segments is None unless packing; n counts the real
        (non-padding) positions, the same either way."""
        n = len(self.examples)
        picks = [self.examples[self.order(j // n)[j % n]]
                 for j in range(i * self.batch_size, (i + 1) * self.batch_size)]
        if self.pack:
            x, y, seg = pack_batch(picks, self.block_size)
        else:
            (x, y), seg = pad_batch(picks), None
        to = lambda t: t if t is None else t.to(self.device)
        # n counts conversation positions, not padding: the log's tokens/s then measures the
        # same work for padded and packed batches, and shows what packing saves.
        return to(x), to(y), to(seg), sum(len(ids) - 1 for ids, _ in picks)


# -----------------------------------------------------------------------------
# Evaluation: the masked loss on held-out chats, exact answers before and after


@torch.no_grad()
def val_loss(model, batches, iters, autocast):
    """Mean supervised-token loss over the same `iters` held-out batches every time."""
    model.eval()
    total = count = 0.0
    for i in range(iters):
        x, y, seg, _ = batches.get(i)
        n = (y != -1).sum().item()  # supervised tokens: batches differ, so weight by them
        with autocast:
            total += model(x, y, segments=seg)[1].item() * n  # mean * count: a token-weighted mean
        count += n
    model.train()
    return total / count


@torch.no_grad()
def loss_by_reply_token(model, examples, first=4, batch_size=16):
    """Mean loss (nats) at the 1st, 2nd, ... first-th token of every reply in
    `examples` (rendered (ids, mask) pairs): a list of `first` floats.

    One mean hides where the loss sits. A reply's first tokens carry the choice (which
    word, spelled with which tokens); once begun, the rest mostly copies the story. From
    the base, a rank-8 adapter leaves nats on the first tokens that full SFT removes
    (lessons.md, lesson 14).
    """
    model.eval()
    sums, counts = torch.zeros(first), torch.zeros(first)
    device = next(model.parameters()).device
    for i in range(0, len(examples), batch_size):
        x, y = (t.to(device) for t in pad_batch(examples[i:i + batch_size]))  # (B, T) each
        nll = -token_logprobs(model(x)[0], y)  # (B, T), 0 where y = -1
        supervised = y != -1
        before = torch.zeros_like(supervised)
        before[:, 1:] = supervised[:, :-1]
        pos = torch.arange(y.size(1), device=device).expand_as(y)  # (B, T)
        # k: tokens into the current reply, counted from the last position where one began
        k = pos - torch.where(supervised & ~before, pos, -1).cummax(-1).values
        keep = supervised & (k < first)
        sums.index_add_(0, k[keep].cpu(), nll[keep].cpu())
        counts.index_add_(0, k[keep].cpu(), torch.ones(int(keep.sum())))
    model.train()
    return (sums / counts.clamp(min=1)).tolist()


def by_question(examples, right):
    """[right, total] per kind of question, the kind being the first two words of the
    question ("Where did", "Who had"; a leading "Question: " skipped).

    One accuracy hides what SFT learned: each kind of story question needs its own
    lookup in the story, and a run may form some of them fully and others partly (lessons.md,
    lesson 10: the runs of its table differ only in what the friend lost).
    >>> q = lambda text: [{"role": "user", "content": text}, {"role": "assistant", "content": "x"}]
    >>> by_question([q("Question: Who had it?\\nA story."), q("Who had the cup?")], right=[])
    {'Who had': [0, 2]}
    """
    counts = {}
    for chat in examples:
        question = chat[-2]["content"].split("\n", 1)[0].removeprefix("Question: ")
        tally = counts.setdefault(" ".join(question.split()[:2]), [0, 0])
        tally[0] += chat in right
        tally[1] += 1
    return counts


def evaluate(model, tok, cfg, log=print):
    """Exact match on held-out story questions, greedy, with the Wilson 95% interval.
    Returns {task: {accuracy, ci_low, ci_high, n, by_question}}."""
    results, tasks = {}, ["story"]
    #> L14 task
    tasks = list(dict.fromkeys([cfg["task"], *tasks]))  # an adaptation's own task first
    #< L14
    for task in [t for t in tasks if cfg[f"eval_{t}"]]:  # an empty path: not evaluated
        examples = read_conversations(cfg[f"eval_{task}"])[:cfg["eval_n"]]
        r = chat_exact_match(model, tok, examples)
        results[task] = {k: r[k] for k in ("accuracy", "ci_low", "ci_high", "n")}
        results[task]["by_question"] = by_question(examples, r["right"])
        example = ""
        for chat, reply in zip(examples, r["replies"]):
            if chat in r["wrong"]:  # one wrong answer shows what is still missing
                question = chat[-2]["content"].split("\n", 1)[0]  # the question, not the story
                example = f"; e.g. {question!r} -> {reply!r} (expected {chat[-1]['content']!r})"
                break
        log(exact_match_line(task, r) + example)
        if len(results[task]["by_question"]) > 1:
            log("  by question: " + ", ".join(f"{kind} {right}/{n}" for kind, (right, n)
                                              in results[task]["by_question"].items()))
        rendered = [c for c in read_conversations(cfg[f"eval_{task}"], tok)[:cfg["eval_n"]]
                    if len(c[0]) - 1 <= model.cfg.block_size]
        results[task]["loss_by_token"] = loss_by_reply_token(model, rendered)
        log("  loss at a reply's tokens 1, 2, 3, 4: " + ", ".join(f"{v:.2f}" for v in results[task]["loss_by_token"])
            + " nats")
    model.train()
    return results


# -----------------------------------------------------------------------------
# The loop


def check_chat_tokens(tok, path):
    """A base model must have embedding rows for the template's tokens (lesson 10's
    data/prepare.py reserves them; a Hugging Face model's come with its tokenizer);
    an older base run cannot be fine-tuned."""
    missing = [t for t in getattr(tok, "template_tokens", CHAT_TOKENS) if t not in getattr(tok, "special_tokens", {})]
    if missing:
        raise ValueError(f"the tokenizer of {path} lacks the chat tokens {missing}: it was built "
                         "before lesson 10. Rebuild the data and the base model: rm -r "
                         "data/storyworld && python pretrain.py config/tiny.py (a Hugging Face "
                         "folder: a Qwen3 or Llama 3 model, whose chat template we implement)")


def train(cfg):
    """Fine-tune cfg["init"] on cfg["data"]; returns {"step", "train_loss", "val_loss", "eval"}."""
    ddp, rank, world, device, log, autocast, scaler = start_run(cfg)
    master = rank == 0

    out = Path(cfg["out_dir"])
    ckpt_path = out / "ckpt.pt"
    # Resume: the fine-tuned run's own checkpoint; otherwise the base model.
    model, tok, ckpt = load_run(ckpt_path if cfg["resume"] else cfg["init"], device)
    check_chat_tokens(tok, cfg["init"])
    #> L14 lora
    rows = {"chat": [tok.special_tokens[t] for t in tok.template_tokens], "all": list(range(tok.vocab_size)),
            "none": []}
    if cfg["lora_tokens"] not in rows:
        raise ValueError(f"lora_tokens={cfg['lora_tokens']!r}: choose one of {sorted(rows)}")
    lora = dict(r=cfg["lora_rank"], alpha=cfg["lora_alpha"], targets=cfg["lora_targets"], qlora=cfg["qlora"],
                tokens=rows[cfg["lora_tokens"]])
    if cfg["qlora"] and not cfg["lora_rank"]:
        raise ValueError("qlora=True trains a LoRA adapter over the 4-bit base: set lora_rank=8 too")
    if cfg["lora_rank"] and not cfg["resume"]:  # on resume load_run rebuilt base + adapter
        torch.manual_seed(cfg["seed"])  # A's random init: the same run from the same config
        apply_adapter(model, lora)
    if "lora" in ckpt:  # resume_training loads the whole state, adapter included
        ckpt["model"] = model.state_dict()
    #< L14
    block_size = model.cfg.block_size
    refresh_data_on_rank0(cfg, ddp, master)
    train_set = load_conversations(cfg["data"], tok, block_size, log)
    val_set = load_conversations(cfg["val_data"], tok, block_size, log)
    model.train()
    # torch's AdamW: lesson 07 tested ours against it step for step, so either will do.
    # betas as in pretraining; no weight decay by default: a few thousand steps from a good
    # model should stay near it, not shrink it.
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                                  betas=(0.9, 0.95))
    step, before = 0, None
    if cfg["resume"]:
        check_resume(ckpt, cfg, RESUMABLE)
        step = resume_training(ckpt, model, optimizer)
        before = ckpt.get("eval_before")
        log(f"resumed from {ckpt_path} at step {step}")
    raw = model
    if cfg["compile"]:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[device] if device.type == "cuda" else None)
    train_batches = ChatBatches(train_set, cfg["batch_size"], cfg["seed"], block_size, cfg["pack"], device)
    val_batches = ChatBatches(val_set, cfg["batch_size"], cfg["seed"] + 1, block_size, cfg["pack"], device)
    supervised = sum(sum(m) for _, m in train_set)
    log(f"model: {raw.num_params():,} parameters from {cfg['init']}; {len(train_set):,} conversations, "
        f"{sum(len(i) for i, _ in train_set):,} tokens ({supervised:,} supervised)")
    #> L14 lora-count
    # Everything that trains, counted: the A, B pairs and any token rows of a LoRA run, or
    # every weight. The share is of the base model (its NF4 weights counted under QLoRA).
    n, n_base = sum(p.numel() for p in raw.parameters() if p.requires_grad), peft.base_param_count(raw)
    how = (f"LoRA r={cfg['lora_rank']} on {len(peft.lora_modules(raw))} layers"
           f"{' over an NF4 base' if cfg['qlora'] else ''}" if cfg["lora_rank"] else "every weight")
    log(f"{how}: {n:,} trainable parameters, {n / n_base:.2%} of the base's {n_base:,}")
    #< L14
    if master and before is None and cfg["eval_n"]:
        log("before fine-tuning:")
        before = evaluate(raw, tok, cfg, log)

    def checkpoint():
        if master:
            save_checkpoint(ckpt_path, training_state(raw, optimizer, step, cfg, tok, chat=True,
                                                      eval_before=before))
    #> L14 lora-checkpoint
    if cfg["lora_rank"]:
        adapter = adapter_checkpoint(raw, lora, cfg["init"])  # hashes the base once

        def checkpoint():  # the adapter alone (its tensors are views: saved as they are then)
            if master:
                save_checkpoint(ckpt_path, {**training_state(raw, optimizer, step, cfg, tok, chat=True,
                                                             eval_before=before), **adapter})
    #< L14

    history, t0, t_start, step0 = {}, time.time(), time.time(), step
    tokens = 0  # conversation tokens trained on since the last log line (padding not counted)
    with logged(out, master, log, checkpoint, lambda: step) as run_log:  # Ctrl-C: a checkpoint, then a clean exit
        while step < cfg["max_iters"]:
            lr = get_lr(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = [train_batches.get((step * world + rank) * cfg["grad_accum"] + m)
                     for m in range(cfg["grad_accum"])]
            # subtle: micro-batches hold different numbers of supervised tokens, so the mean
            # of their mean losses over-weights tokens of short ones. Weight each micro-loss
            # by its share of the step's supervised tokens (over all ranks): the step's loss
            # is then the mean over every supervised token, whatever the split.
            count = torch.tensor(float(sum((y != -1).sum().item() for _, y, _, _ in micro)), device=device)
            if ddp:
                dist.all_reduce(count)
            loss = torch.zeros((), device=device)
            for m, (x, y, seg, real) in enumerate(micro):
                share = (y != -1).sum() * world / count  # DDP averages over ranks: undo it
                with model.no_sync() if ddp and m < len(micro) - 1 else nullcontext(), autocast:
                    _, micro_loss = model(x, y, segments=seg)
                    scaler.scale(micro_loss * share).backward()
                loss += micro_loss.detach() * share / world
                tokens += real
            if ddp:
                dist.all_reduce(loss)
            norm = optimizer_step(raw, optimizer, scaler, loss, cfg["grad_clip"], step, ckpt_path)
            step += 1
            if step % cfg["log_interval"] == 0 or step == cfg["max_iters"]:
                dt = time.time() - t0
                eta = (cfg["max_iters"] - step) * (time.time() - t_start) / (step - step0)
                log(progress_line(step, cfg["max_iters"], loss.item(), lr, norm.item(),
                                  dt / cfg["log_interval"], tokens * world / dt, eta))
                history = {"step": step, "train_loss": loss.item(), "lr": lr, "grad_norm": norm.item()}
                t0, tokens = time.time(), 0
            if step % cfg["eval_interval"] == 0 or step == cfg["max_iters"]:
                history = {**history, "step": step,
                           "val_loss": val_loss(raw, val_batches, cfg["eval_iters"], autocast)}
                log(f"step {step}: val loss {history['val_loss']:.4f} (held-out chats, supervised tokens)")
                checkpoint()
            if history.get("step") == step:  # one JSON line per logged step
                run_log.write(history)
    if run_log.interrupted:
        return {**history, "step": step}
    log(f"{step - step0} steps in {(time.time() - t_start) / 60:.1f} min")
    if master:
        plot_log(out, [["train_loss", "val_loss"]], xlabel="step", ylabel="loss (nats per supervised token)")
    after = None
    if master and cfg["eval_n"]:
        log("after fine-tuning:")
        after = evaluate(raw, tok, cfg, log)
        (out / "eval.json").write_text(json.dumps({"before": before, "after": after}, indent=2))
    return {**history, "step": step, "eval": after}


if __name__ == "__main__":
    run_main("sft.py", DEFAULTS, train, sys.argv[1:])
#< L10
