#> L11 align
"""
align.py -- learning from preferences: teach a chat model which of two answers
to prefer, with DPO or with a reward model, from the SFT checkpoint of lesson 10.

    python data/prepare.py dpo           # preference pairs from the story world
    python align.py config/dpo.py        # lesson 11: DPO, minutes on a 2-core CPU
    python align.py config/reward.py     # lesson 12: a Bradley-Terry reward model
    python align.py config/dpo.py --beta=0.5 --resume   # any key can be overridden

Lesson 11: a loss on (chosen, rejected) pairs that needs no reward model at all
(DPO). Lesson 12: learn the reward itself, a score that ranks chosen above
rejected (Bradley-Terry), as InstructGPT did. rl.py samples answers and climbs
such a score (PPO, GRPO), with the log-probs and the reference model of this file.

Papers: Rafailov et al. 2023, "Direct Preference Optimization" (DPO); Azar et
al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
Preferences" (IPO); Ouyang et al. 2022, "Training language models to follow
instructions with human feedback" (InstructGPT).
"""

import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from data.chats import jsonl_rows, read_conversations, refresh_built_in, refresh_data_on_rank0
from run import (RESUMABLE, RUN_DEFAULTS, chat_exact_match, check_resume, exact_match_line, load_checkpoint,
                 load_run, logged, model_from_checkpoint, optimizer_step, plot_log,
                 resume_training, run_main, save_checkpoint, start_run, token_logprobs, training_state)
#> L14 import
import peft
from run import LORA_DEFAULTS, adapter_checkpoint, apply_adapter
#< L14

# -----------------------------------------------------------------------------
# Config: every key a run can set, with its default. A config file or
# --key=value overrides these; anything else is an error that lists them.

# Where a tuning run starts and how its loop runs: align.py's and rl.py's alike.
TUNE_DEFAULTS = dict(
    init="out/sft",  # the run folder (or ckpt.pt) to start from: lesson 10's SFT model
    out_dir="",  # empty: out/<method>
    seed=1337,
    lr=1e-4,
    weight_decay=0.0,
    grad_clip=1.0,  # max global gradient norm; 0 disables
    max_iters=200,
    log_interval=10,
    eval_interval=50,
    # device ("auto": cuda > mps > cpu), resume, and dtype: float32 for exact log-probs and
    # ratios ("auto": bf16 autocast where native, faster)
    **{**RUN_DEFAULTS, "dtype": "float32"},
)

DEFAULTS = dict(
    method="dpo",  # "dpo" (lesson 11) or "reward" (12)
    **TUNE_DEFAULTS,
    batch_size=8,  # pairs per step
    eval_examples=200,  # DPO: held-out questions for exact match before/after
    # DPO: defaults as TRL's DPOConfig
    beta=0.1,  # how far from the reference the policy may move: small beta, far
    loss_type="sigmoid",  # "sigmoid" (DPO), "ipo", "hinge"
    label_smoothing=0.0,  # conservative DPO: the probability that a label is flipped
    rpo_alpha=0.0,  # weight of an NLL term on the chosen answers (RPO); 0: plain DPO
    reference="precompute",  # "precompute" the reference log-probs once, or keep a frozen "copy"
    data="data/dpo/train.jsonl",  # preference pairs (python data/prepare.py dpo)
    val_data="data/dpo/val.jsonl",  # held-out pairs, about held-out stories
    eval_pairs=300,  # held-out pairs for the preference accuracy
    eval_story="data/sft/eval_story.jsonl",  # held-out questions for exact match (lesson 10)
    #> L12 config
    rm_nll_coef=0.0,  # reward model: weight of an NLL term on the chosen answers (GRM); 0: score alone
    #< L12
    #> L14 align-config
    **LORA_DEFAULTS,  # lora_rank > 0: train a LoRA adapter on the init model (lesson 14)
    #< L14
)
RESUMABLE = RESUMABLE | {"eval_examples"}  # what a resumed run may change: run.py's, and the evaluation

# -----------------------------------------------------------------------------
# Sequence log-probabilities: how likely the model finds an answer


def next_token_logprobs(model, ids):
    """log p(ids[:, t+1] | ids[:, :t+1]) for every position: (B, T) -> (B, T-1), fp32.

    Entry j is the log-probability of token j+1, read from the logits at position
    j: everything here and in rl.py indexed (B, T-1) means "the action ids[:, j+1]
    taken in the state ids[:, :j+1]"."""
    logits, _ = model(ids[:, :-1])  # (B, T-1, V): the last position predicts nothing we have
    return token_logprobs(logits, ids[:, 1:])  # (B, T-1)


#> L11 logprobs exercise
def sequence_logprobs(model, ids, mask):
    """(summed, per_token): log p of the completion tokens only.

    ids, mask: (B, T), mask 1 on the completion (answer) tokens, 0 on the prompt
    and on padding. Returns summed (B,) = sum over completion tokens of
    log p(token | everything before it), and per_token (B, T-1) aligned with
    ids[:, 1:] (see next_token_logprobs), zero off the completion.
    Example: ids [[p, p, a1, a2, pad]], mask [[0, 0, 1, 1, 0]] ->
    summed = log p(a1 | p p) + log p(a2 | p p a1).
    Padding goes on the right: the model is causal, so a pad token can change
    nothing that comes before it.
    """
    per_token = next_token_logprobs(model, ids) * mask[:, 1:]  # (B, T-1)
    return per_token.sum(-1), per_token
#< L11


def pad_right(seqs, value=0):
    """Lists of ints, of different lengths -> one (B, T_max) tensor, right-padded."""
    T = max(len(s) for s in seqs)
    return torch.tensor([list(s) + [value] * (T - len(s)) for s in seqs])


def collate_pairs(pairs, device="cpu"):
    """Preference pairs -> ids, mask (2B, T): the B chosen answers, then the B rejected.

    pairs: (chosen_ids, chosen_mask, rejected_ids, rejected_mask) lists. Chosen and
    rejected go through the model as one batch: one forward instead of two (half
    the kernel launches, bigger matmuls), and both halves see exactly the same
    weights, which matters once dropout or a DDP all-reduce is involved.
    """
    ids = pad_right([p[0] for p in pairs] + [p[2] for p in pairs])
    mask = pad_right([p[1] for p in pairs] + [p[3] for p in pairs])
    return ids.to(device), mask.to(device)


# -----------------------------------------------------------------------------
# The DPO loss (Rafailov et al. 2023)
#
# RLHF maximises E[r(x, y)] - beta * KL(pi || pi_ref). Its optimum is known in
# closed form: pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x). Solve for the
# reward: r(x, y) = beta log(pi*(y|x) / pi_ref(y|x)) + beta log Z(x). Put this
# into the Bradley-Terry model of preferences, p(y_w > y_l) = sigmoid(r_w - r_l):
# Z(x) is the same for both answers to the same prompt and cancels, leaving a
# loss on the policy alone -- no reward model, no sampling:
#     loss = -log sigmoid(beta * [(log pi_w - log pi_ref_w) - (log pi_l - log pi_ref_l)])


#> L11 dpo-loss exercise
def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta=0.1, loss_type="sigmoid",
             label_smoothing=0.0):
    """(loss, chosen_rewards, rejected_rewards) from sequence log-probs, each (B,).

    The implicit reward of an answer is beta * (log pi - log pi_ref); the loss
    pushes the chosen reward above the rejected one. h = the difference of the
    two log-ratios (a logit: how much more the policy than the reference
    prefers the chosen answer):
      "sigmoid": -log sigmoid(beta h), DPO; with label_smoothing eps, the pair
                 is wrong with probability eps (conservative DPO):
                 -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
      "hinge":   relu(1 - beta h) (SLiC, Zhao et al. 2023): satisfied at a margin
      "ipo":     (h - 1 / (2 beta))^2 (Azar et al. 2023): regresses h to a finite
                 target instead of pushing it to infinity; pass log-probs
                 averaged over each answer's tokens, as the IPO paper does.
    Example: at policy == reference h = 0, the sigmoid loss is ln 2 = 0.693
    and both rewards are 0. The loss is the mean over pairs.
    """
    h = (pi_chosen - pi_rejected) - (ref_chosen - ref_rejected)  # (B,)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "hinge":
        losses = F.relu(1 - beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose sigmoid, hinge or ipo")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing applies to loss_type='sigmoid' only, not {loss_type!r}")
    # The rewards are for logging only: detached, so they never steer the gradient.
    chosen_rewards = beta * (pi_chosen - ref_chosen).detach()
    rejected_rewards = beta * (pi_rejected - ref_rejected).detach()
    return losses.mean(), chosen_rewards, rejected_rewards
#< L11


# -----------------------------------------------------------------------------
# The reference model
#
# DPO (and rl.py's PPO, GRPO) measure the policy against a frozen reference: the SFT
# model it started from. Two ways to have it on a CPU:
#   "copy":       a frozen copy in eval mode, run on every batch: twice the
#                 weights in memory and one more forward per step;
#   "precompute": the reference never changes, and at step 0 it *is* the
#                 policy, so its log-probs of a fixed dataset can be computed
#                 once before training and stored: one forward per pair in
#                 total, no second model. (Works for DPO's fixed pairs, not for
#                 PPO/GRPO, whose samples are new each step.)
REFERENCES = ["precompute", "copy"]
#> L14 reference
# Lesson 14 adds a third, "lora" (python align.py config/dpo.py --lora_rank=8
# --reference=lora): when only a LoRA adapter trains, the policy with its
# adapters switched off *is* the init model -- no copy, no precompute.
REFERENCES.append("lora")


class AdaptersOff(nn.Module):
    """The policy with every LoRA adapter switched off (peft.lora_disabled): the frozen
    base it is fine-tuned from, sharing its weights -- the reference at no memory cost."""

    def __init__(self, policy):
        super().__init__()
        self.policy = [policy]  # a list, not a submodule: the optimizer must not see it twice

    def forward(self, *args, **kwargs):
        policy = self.policy[0]
        training = policy.training
        policy.eval()  # no dropout: the reference gives the same numbers every time
        try:
            with peft.lora_disabled(policy):
                return policy(*args, **kwargs)
        finally:
            policy.train(training)
#< L14


def frozen_copy(model):
    """A copy of `model` that never trains: eval mode, no gradients."""
    return copy.deepcopy(model).eval().requires_grad_(False)


def make_reference(policy, cfg, device):
    """The reference model for cfg["reference"]: the init model, frozen."""
    if cfg["reference"] not in REFERENCES:
        raise ValueError(f"unknown reference {cfg['reference']!r}; choose one of {', '.join(REFERENCES)}")
    #> L14 reference
    if cfg["reference"] == "lora":
        if not cfg["lora_rank"]:
            raise ValueError("reference='lora' is the policy with its adapters off: set lora_rank=8 too")
        return AdaptersOff(policy)
    #< L14
    return frozen_copy(load_run(cfg["init"], device)[0])  # also when resuming: the policy has moved


@torch.no_grad()
def reference_logprobs(ref, ids, mask):
    """The reference's (summed, per_token) log-probs, as sequence_logprobs; no graph."""
    training = ref.training
    ref.eval()  # no dropout: the reference must give the same numbers every time
    out = sequence_logprobs(ref, ids, mask)
    ref.train(training)
    return out


# -----------------------------------------------------------------------------
# Preference data: TRL's format, one JSON object per line
#   {"prompt": "...", "chosen": "...", "rejected": "..."}             plain text, or
#   {"prompt": [messages], "chosen": [messages], "rejected": [messages]}  chat


def encode_preference(tok, row):
    """One pair -> (chosen_ids, chosen_mask, rejected_ids, rejected_mask), mask 1 on
    the answer only. Message lists go through the chat template of lesson 10."""
    prompt, out = row["prompt"], []
    for answer in (row["chosen"], row["rejected"]):
        if isinstance(prompt, str) and isinstance(answer, str):
            p, a = tok.encode(prompt, allowed_special="all"), tok.encode(answer, allowed_special="all")
            out += [p + a, [0] * len(p) + [1] * len(a)]
        elif isinstance(prompt, list) and isinstance(answer, list):
            ids, mask = tok.render_conversation(prompt + answer)
            # Only the last answer is judged: earlier assistant turns of the prompt are context.
            P = len(tok.render_conversation(prompt, for_completion=True)[0])
            out += [list(ids), [0] * P + list(mask[P:])]
        else:
            raise ValueError("prompt, chosen and rejected must be all strings or all message lists")
    return tuple(out)


def read_preferences(path, tok, block_size, limit=None, log=print):
    """The first `limit` pairs (None: all) of a preference JSONL file, encoded; a bad
    line fails with its number. Pairs longer than the context are dropped, and counted."""
    refresh_built_in(Path(path).parent)  # data/dpo: made on first use, remade when stale
    pairs, too_long = [], 0
    for n, row in jsonl_rows(path):
        if limit is not None and len(pairs) == limit:
            break
        try:
            if not isinstance(row, dict) or not {"prompt", "chosen", "rejected"} <= row.keys():
                raise ValueError('expected a JSON object with keys "prompt", "chosen", "rejected"')
            pair = encode_preference(tok, row)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise ValueError(f"{path}:{n}: {e}") from None
        if max(len(pair[0]), len(pair[2])) > block_size:
            too_long += 1
            continue
        pairs.append(pair)
    if not pairs:
        raise ValueError(f"{path} holds no pair that fits in {block_size} tokens")
    log(f"{path}: {len(pairs):,} pairs" + (f" ({too_long} longer than {block_size} tokens dropped)" if too_long else ""))
    return pairs


@torch.no_grad()
def precompute_reference(ref, pairs, batch_size, device):
    """(N, 2) summed reference log-probs (chosen, rejected) of every pair, once."""
    out = []
    for i in range(0, len(pairs), batch_size):
        ids, mask = collate_pairs(pairs[i:i + batch_size], device)
        logps = reference_logprobs(ref, ids, mask)[0]  # (2b,)
        out.append(logps.view(2, -1).T)  # (b, 2)
    return torch.cat(out)


def dpo_step(policy, ids, mask, ref_logps, cfg):
    """DPO loss and metrics for one batch from collate_pairs; ref_logps (2B,) summed.

    With loss_type "ipo" both the policy's and the reference's log-probs are
    divided by each answer's token count first (IPO's length normalisation).
    """
    logps, _ = sequence_logprobs(policy, ids, mask)  # (2B,): one forward for both halves
    n = mask[:, 1:].sum(-1).clamp(min=1)  # answer tokens per row
    B = ids.size(0) // 2
    nll = -(logps[:B] / n[:B]).mean()  # the SFT loss on the chosen answers, per token
    if cfg["loss_type"] == "ipo":
        logps, ref_logps = logps / n, ref_logps / n
    loss, chosen_r, rejected_r = dpo_loss(logps[:B], logps[B:], ref_logps[:B], ref_logps[B:],
                                          cfg["beta"], cfg["loss_type"], cfg["label_smoothing"])
    # RPO (Pang et al. 2024; TRL's rpo_alpha): + alpha * NLL(chosen) keeps the chosen
    # answers likely, the cure for the failure mode below.
    loss = loss + cfg["rpo_alpha"] * nll
    # Watch both log-probs: DPO only needs their difference to grow, and often both
    # fall (probability flows to answers in neither set) -- a known failure mode.
    metrics = {"loss": loss.item(), "reward_acc": (chosen_r > rejected_r).float().mean().item(),
               "margin": (chosen_r - rejected_r).mean().item(),
               "logp_chosen": logps[:B].mean().item(), "logp_rejected": logps[B:].mean().item(),
               "logp_acc": (logps[:B] > logps[B:]).float().mean().item()}
    return loss, metrics


def batch_indices(n, batch_size, step, seed):
    """Which of n examples step `step` trains on: a fresh shuffle every epoch, a
    function of (seed, step) only -- so a resumed run sees the same batches."""
    epoch, k = divmod(step, max(1, n // batch_size))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    return order[k * batch_size:(k + 1) * batch_size]


def setup_dpo(policy, tok, cfg, device, log):
    """DPO's part of the run: the pairs, the reference, one step, the held-out check."""
    # One epoch of what the run will see: every pair is read (and its reference scored) once.
    train = read_preferences(cfg["data"], tok, policy.cfg.block_size, cfg["max_iters"] * cfg["batch_size"], log)
    val = read_preferences(cfg["val_data"], tok, policy.cfg.block_size, cfg["eval_pairs"], log)
    ref = make_reference(policy, cfg, device)
    ref_train = ref_val = None
    if cfg["reference"] == "precompute":
        t0 = time.time()
        ref_train, ref_val = (precompute_reference(ref, p, cfg["batch_size"], device) for p in (train, val))
        log(f"reference log-probs of {len(train) + len(val):,} pairs precomputed in {time.time() - t0:.1f}s")
        ref = None  # not needed any more: the memory of a second model is free again

    def ref_logps(pairs, idx, table):
        if table is not None:
            return torch.cat([table[idx, 0], table[idx, 1]])  # (2b,): chosen, then rejected
        return reference_logprobs(ref, *collate_pairs([pairs[j] for j in idx], device))[0]

    def step(i, update):
        idx = batch_indices(len(train), cfg["batch_size"], i, cfg["seed"])
        ids, mask = collate_pairs([train[j] for j in idx], device)
        loss, metrics = dpo_step(policy, ids, mask, ref_logps(train, idx, ref_train), cfg)
        update(loss)
        return metrics

    @torch.no_grad()
    def evaluate():
        """Held-out pairs: pref_acc, the implicit reward ranks chosen first (0 at step 0:
        both rewards are 0, a tie); logp_acc, the policy alone finds chosen more likely."""
        policy.eval()
        pref = logp = 0.0
        for i in range(0, len(val), cfg["batch_size"]):
            idx = torch.arange(i, min(i + cfg["batch_size"], len(val)))
            ids, mask = collate_pairs([val[j] for j in idx], device)
            m = dpo_step(policy, ids, mask, ref_logps(val, idx, ref_val), cfg)[1]
            pref, logp = pref + m["reward_acc"] * len(idx), logp + m["logp_acc"] * len(idx)
        policy.train()
        return {"pref_acc": pref / len(val), "logp_acc": logp / len(val)}

    return {"module": policy, "policy": policy, "step": step, "evaluate": evaluate,
            "plot": ["loss", "reward_acc", "logp_chosen", "logp_rejected"]}


SETUPS = {"dpo": setup_dpo}  # method -> its part of the run (lesson 12 adds "reward")

#> L12 reward

# -----------------------------------------------------------------------------
# A scalar head: the reward model and the critic


def with_scalar_head(model, keep_lm=False):
    """A copy of a CausalLM whose unembedding (C -> V) becomes one number (C -> 1).

    Read at a position, the output scores everything up to it: at the last token
    of (prompt, answer) it is the reward model's score; at every position, the
    critic's value estimate. The head starts at zero: no opinion before training.
    keep_lm: the unembedding stays, behind the new row: the output is (B, T, 1 + V),
    the score, then next-token logits as before (the reward model's NLL term).
    """
    scalar = copy.deepcopy(model)
    # subtle: with tied embeddings lm_head.weight *is* tok_emb.weight; assigning a new
    # module unties them and leaves the embedding as it was.
    W = model.lm_head.weight  # (V, C)
    scalar.lm_head = nn.Linear(model.cfg.n_embd, 1 + len(W) * keep_lm, bias=True, device=W.device)
    nn.init.zeros_(scalar.lm_head.weight)
    nn.init.zeros_(scalar.lm_head.bias)
    if keep_lm:
        with torch.no_grad():
            scalar.lm_head.weight[1:] = W
    return scalar


def last_index(mask):
    """Position of each row's last 1 in a (B, T) mask -> (B,); the final answer token."""
    T = mask.size(1)
    return T - 1 - mask.flip(-1).argmax(-1)


def reward_scores(rm, ids, mask, out=None):
    """The reward model's score of each (prompt, answer): its output at the last
    answer token. ids, mask (B, T) with mask on the answer, as collate_pairs;
    out: rm(ids)[0] when the caller has it already."""
    out = (rm(ids)[0] if out is None else out)[..., 0].float()  # (B, T)
    return out.gather(1, last_index(mask)[:, None]).squeeze(1)


#> L12 reward-model exercise
def reward_model_loss(r_chosen, r_rejected):
    """Bradley-Terry: p(chosen > rejected) = sigmoid(r_c - r_r); loss -log of it.

    Only differences of rewards are defined: adding a constant to every score
    changes nothing. Example: r_c = r_r gives ln 2; r_c - r_r = 2 gives 0.127.
    """
    return -F.logsigmoid(r_chosen - r_rejected).mean()
#< L12


def masked_mean(x, mask):
    """Mean of x over the positions where mask is 1 (0 if there are none)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def load_reward_model(path, device):
    """A reward model saved by `align.py config/reward.py`, frozen: the scalar head is
    put on the fresh model before its weights load (as it was trained, keep_lm or not)."""
    ckpt = load_checkpoint(Path(path) / "ckpt.pt" if Path(path).is_dir() else path, device)
    if not ckpt.get("scalar_head"):
        raise ValueError(f"{path} is not a reward model; train one: python align.py config/reward.py")
    rm, _ = model_from_checkpoint(path, device, ckpt,
                                  head=lambda model, ckpt: with_scalar_head(model, ckpt.get("keep_lm", False)))
    return rm.requires_grad_(False)  # in eval mode already


def setup_reward(policy, tok, cfg, device, log):
    """The reward model trains on the DPO pairs: its score ranks chosen above rejected."""
    train = read_preferences(cfg["data"], tok, policy.cfg.block_size, cfg["max_iters"] * cfg["batch_size"], log)
    val = read_preferences(cfg["val_data"], tok, policy.cfg.block_size, cfg["eval_pairs"], log)
    # The score alone is one bit per pair: the trunk has to learn to read the story
    # from that. An NLL term on the chosen answers, through the unembedding kept
    # beside the score (GRM: Yang et al. 2024, "Regularizing hidden states enables
    # learning generalizable reward model for LLMs", their SFT regulariser), keeps
    # the trunk answering the question while the score learns to judge answers.
    if cfg["rm_nll_coef"] < 0:
        raise ValueError(f"rm_nll_coef={cfg['rm_nll_coef']}: it weighs a loss, so >= 0 (0: the score alone)")
    rm = with_scalar_head(policy, keep_lm=cfg["rm_nll_coef"] > 0).train()

    def scores(pairs, idx):
        ids, mask = collate_pairs([pairs[j] for j in idx], device)
        out = rm(ids)[0]  # (2b, T, 1) or, keep_lm, (2b, T, 1 + V)
        r = reward_scores(rm, ids, mask, out)  # (2b,): chosen, then rejected
        return r[:len(idx)], r[len(idx):], (ids, mask, out)

    def step(i, update):
        idx = batch_indices(len(train), cfg["batch_size"], i, cfg["seed"])
        rc, rr, (ids, mask, out) = scores(train, idx)
        loss = reward_model_loss(rc, rr)
        # The chosen half: -log p of each answer token, mean over all of them in the batch
        # (DPO's RPO term averages per answer first; for 2-10 token answers they differ little).
        if cfg["rm_nll_coef"]:
            logp = token_logprobs(out[:len(idx), :-1, 1:], ids[:len(idx), 1:])  # (b, T-1)
            loss = loss - cfg["rm_nll_coef"] * masked_mean(logp, mask[:len(idx), 1:])
        update(loss)
        return {"loss": loss.item(), "acc": (rc > rr).float().mean().item(), "margin": (rc - rr).mean().item()}

    @torch.no_grad()
    def evaluate():  # held-out pair accuracy
        rm.eval()
        right = sum((lambda c, r, _: (c > r).sum().item())(*scores(val, torch.arange(i, min(i + cfg["batch_size"], len(val)))))
                    for i in range(0, len(val), cfg["batch_size"]))
        rm.train()
        return {"pair_acc": right / len(val)}

    return {"module": rm, "policy": None, "step": step, "evaluate": evaluate, "plot": ["loss", "acc"],
            "checkpoint": {"scalar_head": True, "keep_lm": cfg["rm_nll_coef"] > 0}}


SETUPS["reward"] = setup_reward
#< L12


# -----------------------------------------------------------------------------
# The run: one loop for both methods (SETUPS: each method's part)


def held_out_exact_match(model, tok, path, n, log):
    """Greedy exact match on the first n questions of a held-out chat JSONL (lesson 10)."""
    r = chat_exact_match(model, tok, read_conversations(path)[:n])
    model.train()
    log(exact_match_line(Path(path).stem, r))
    return {k: r[k] for k in ("accuracy", "ci_low", "ci_high", "n")}


def backward_and_step(loss, optimizer, scaler, grad_clip, step, ckpt_path):
    """Backward, then run.optimizer_step (it stops on a non-finite loss and clips all the
    optimizer's parameters together to grad_clip). Under torchrun each process has its
    own batch's gradient; the all-reduce averages them, so the copies stay equal (DDP
    does this in backward(); the policy, the critic and generate() are simpler unwrapped)."""
    scaler.scale(loss).backward()  # fp16: the loss scaled up, so small gradients survive
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if dist.is_initialized():
        for p in params:
            dist.all_reduce(p.grad)  # a sum (gloo has no AVG): divide by the process count
            p.grad /= dist.get_world_size()
    optimizer_step(params, optimizer, scaler, loss, grad_clip, step, ckpt_path)
#> L14 lora


def start_lora(policy, cfg, ckpt=None):
    """lora_rank > 0: only a LoRA adapter on `policy` trains; the init model underneath
    stays as it was. Returns what a checkpoint adds (the settings, the init's hash), or
    None. ckpt, when resuming, holds the adapter alone: the init's weights complete it."""
    if not cfg["lora_rank"]:
        return None
    if peft.lora_modules(policy):
        raise ValueError(f"{cfg['init']} is a LoRA run; align from a full fine-tune, or train "
                         "this run's adapter further with lora_rank=0")
    lora = dict(r=cfg["lora_rank"], alpha=cfg["lora_alpha"], targets=cfg["lora_targets"], qlora=False)
    apply_adapter(policy, lora)  # A's init draws from the seed set before: reproducible
    adapter = adapter_checkpoint(policy, lora, cfg["init"])  # hashes the init once
    if ckpt:
        if ckpt["lora"]["base_sha256"] != adapter["lora"]["base_sha256"]:
            raise ValueError(f"{cfg['init']} changed since this run began (SHA-256 differs): the "
                             "adapter would sit on another model; restore it or use another --out_dir")
        ckpt["model"] = {**policy.state_dict(), **ckpt["model"]}
    return adapter
#< L14


def start_tuning(cfg, setups, log):
    """The start of align.py's and rl.py's runs: this process's place (run.start_run), the
    built-in data, the checkpoint to resume (None if not) and the policy to tune, seeded.
    Returns ((rank, world, device, log, autocast, scaler), out, ckpt, policy, tok)."""
    if cfg["method"] not in setups:
        raise ValueError(f"unknown method {cfg['method']!r}; choose one of {sorted(setups)}")
    ddp, rank, world, device, log, autocast, scaler = start_run(cfg, log)
    refresh_data_on_rank0(cfg, ddp, rank == 0)
    out = Path(cfg["out_dir"] or f"out/{cfg['method']}")
    if ckpt := load_checkpoint(out / "ckpt.pt", device) if cfg["resume"] else None:  # fail fast
        check_resume(ckpt, {**cfg, "out_dir": str(out)}, RESUMABLE)  # the config may differ only in RESUMABLE
    torch.manual_seed(cfg["seed"])
    policy, tok, _ = load_run(cfg["init"], device)
    return (rank, world, device, log, autocast, scaler), out, ckpt, policy, tok


def train(cfg, log=print):
    """Run cfg["method"] from cfg["init"]; returns {"step", "before", "after", "seconds"}."""
    t_start = time.time()
    (rank, world, device, log, autocast, scaler), out, ckpt, policy, tok = start_tuning(cfg, SETUPS, log)
    master, ckpt_path = rank == 0, out / "ckpt.pt"  # only one process evaluates, logs and writes files
    #> L14 lora
    if cfg["lora_rank"] and cfg["method"] == "reward":
        raise ValueError("lora_rank: the reward model trains every weight (its checkpoint is "
                         "read as a plain model); use lora_rank=0")
    adapter = start_lora(policy, cfg, ckpt)
    #< L14
    policy.train()
    run = SETUPS[cfg["method"]](policy, tok, cfg, device, log)
    optimizer = torch.optim.AdamW(run["module"].parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                                  betas=(0.9, 0.95))
    step, before = 0, None
    if ckpt:
        step, before = resume_training(ckpt, run["module"], optimizer), ckpt["before"]
        log(f"resumed from {ckpt_path} at step {step}")

    def update(loss):  # one optimizer step, with run.py's guards
        backward_and_step(loss, optimizer, scaler, cfg["grad_clip"], step, ckpt_path)

    def evaluate(final):  # the method's own held-out number; DPO's exact match at the start and end
        result = run["evaluate"]()
        if run["policy"] is not None and final and cfg["eval_examples"]:
            result["exact_match"] = held_out_exact_match(run["policy"], tok, cfg["eval_story"],
                                                         cfg["eval_examples"], log)
        return result

    if master and before is None:
        log("before:")
        before = evaluate(True)
        log(f"  {before}")

    def checkpoint():
        if master:
            # chat: a policy (not the reward model) answers through the template, so chat.py
            # and eval.py open it in chat mode, as they do lesson 10's checkpoint.
            state = training_state(run["module"], optimizer, step, cfg, tok, before=before,
                                   chat=cfg["method"] != "reward", **run.get("checkpoint", {}))
            #> L14 lora-checkpoint
            if adapter:  # a LoRA run: the A, B pairs and the init's hash
                state.update(adapter, model=peft.lora_state_dict(policy))
            #< L14
            save_checkpoint(ckpt_path, state)

    t0, rows = time.time(), []
    with logged(out, master, log, checkpoint, lambda: step) as run_log:  # Ctrl-C: save, exit cleanly
        while step < cfg["max_iters"]:
            with autocast:  # each process its own batch: number (step, rank) of the stream
                rows.append(run["step"](step * world + rank, update))
            step += 1
            if step % cfg["log_interval"] == 0 or step == cfg["max_iters"]:
                row = {"step": step, **{k: sum(r[k] for r in rows) / len(rows) for k in rows[0]},
                       "s_per_step": (time.time() - t0) / len(rows)}
                if step % cfg["eval_interval"] == 0 or step == cfg["max_iters"]:
                    if master:
                        row.update(evaluate(False))
                    checkpoint()
                log("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
                run_log.write(row)
                t0, rows = time.time(), []
    if run_log.interrupted:
        return {"step": step, "before": before}
    if not master:
        return {"step": step}
    log("after:")
    after = evaluate(True)
    seconds = time.time() - t_start
    log(f"  {after}\n{cfg['method']}: {step} steps in {seconds / 60:.1f} min")
    (out / "eval.json").write_text(json.dumps({"before": before, "after": after, "seconds": seconds}, indent=2))
    plot_log(out, [[key] for key in run["plot"]], x="step", name="curves.png")
    return {"step": step, "before": before, "after": after, "seconds": seconds}


if __name__ == "__main__":
    run_main("align.py", DEFAULTS, train, sys.argv[1:], {"ppo": "rl.py", "grpo": "rl.py"})
#< L11
