#> L11 align
"""
align.py -- teach a chat model which answers to prefer: DPO, a reward model with
PPO, and GRPO, all starting from the SFT checkpoint of lesson 10.

    python data/prepare.py dpo           # preference pairs from the story world
    python align.py config/dpo.py        # lesson 11: DPO, minutes on a 2-core CPU
    python align.py config/reward.py     # lesson 12: a Bradley-Terry reward model ...
    python align.py config/ppo.py        #            ... and PPO against a reward
    python align.py config/grpo.py       # lesson 13: GRPO with verifiable rewards
    python align.py config/dpo.py --beta=0.5 --resume   # any key can be overridden

The chapter in three parts, each a different answer to "which answer is better?".
Lesson 11: a dataset of (chosen, rejected) answers and a loss that needs no
reward model at all (DPO). Lesson 12: RLHF as InstructGPT did it -- learn a
reward from the pairs, then sample, score and climb it with PPO, a critic and
GAE, leashed to the SFT model by a KL penalty. Lesson 13: GRPO -- PPO without
the critic, advantages from a group of answers to the same prompt, rewards
from a rule that checks the answer.

Papers: Rafailov et al. 2023, "Direct Preference Optimization" (DPO);
Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from
Human Preferences" (IPO); Ouyang et al. 2022, "Training language models to
follow instructions with human feedback" (InstructGPT); Schulman et al. 2017,
"Proximal Policy Optimization Algorithms"; Schulman et al. 2016, "High-
Dimensional Continuous Control Using Generalized Advantage Estimation" (GAE);
Shao et al. 2024, "DeepSeekMath" (GRPO); Yu et al. 2025, "DAPO"; Liu et al.
2025, "Understanding R1-Zero-Like Training" (Dr. GRPO).
"""

import contextlib
import copy
import json
import re
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

#< L11
#> L14 import
import peft
#< L14
#> L11 align
from run import (check_resume, exact_match, load_checkpoint, load_run, refresh_data_on_rank0,
                 resume_training, run_main, save_checkpoint, setup_device, setup_precision,
                 training_state)
from tokenizer import chat_end, jsonl_rows, read_conversations, refresh_built_in

# -----------------------------------------------------------------------------
# Config: every key a run can set, with its default. A config file or
# --key=value overrides these; anything else is an error that lists them.

DEFAULTS = dict(
    method="dpo",  # "dpo" (lesson 11), "reward" or "ppo" (12), "grpo" (13)
    init="out/sft",  # the run folder (or ckpt.pt) to start from: lesson 10's SFT model
    out_dir="",  # empty: out/<method>
    seed=1337,
    lr=1e-4,
    weight_decay=0.0,
    grad_clip=1.0,  # max global gradient norm; 0 disables
    batch_size=8,  # DPO/reward: pairs per step
    max_iters=200,
    log_interval=10,
    eval_interval=50,
    eval_examples=200,  # held-out questions for exact match before/after
    device="auto",
    dtype="float32",  # exact log-probs and ratios; "auto": bf16 autocast where native (faster)
    resume=False,
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
    eval_arith="data/sft/eval_arith.jsonl",
)
#< L11
#> L12 config
DEFAULTS.update(
    # Rollouts and rewards
    task="arith",  # the verifiable task PPO/GRPO train and test on: "arith" or "story"
    reward="rule",  # "rule" (exact match) or "model" (the reward model at reward_init)
    reward_init="out/reward",
    rm_nll_coef=0.0,  # reward model: weight of an NLL term on the chosen answers (GRM); 0: score alone
    prompts_per_iter=8,  # prompts sampled per PPO/GRPO iteration
    samples_per_prompt=4,  # completions per prompt (GRPO calls it the group size)
    max_new_tokens=24,  # the longest story answer is 10 tokens; past half of this is rambling (GRPO)
    temperature=1.0,  # 1: the samples come from the very policy whose log-probs we use
    nonend_penalty=1.0,  # subtracted from the score of a response that never ends
    # PPO: defaults as TRL's last PPOConfig
    prompts="data/sft/train.jsonl",  # chat JSONL: questions with reference answers
    kl_coef=0.05,  # beta_KL of the per-token penalty (GRPO's beta, lesson 13)
    kl_estimator="k1",  # "k1" (log-ratio) or "k3" (always >= 0), see kl_estimate
    max_kl=5.0,  # the bound the run promises: mean KL per response to the reference (nats)
    clip_eps=0.2,  # epsilon of the clipped surrogate (GRPO's eps_low)
    clip_value=0.2,  # epsilon of the clipped value loss
    vf_coef=0.1,
    gamma=1.0,
    lam=0.95,
    ppo_epochs=4,
    minibatch_size=8,
)
#< L12
#> L13 config
DEFAULTS.update(
    eps_high=0.2,  # DAPO's clip-higher: the upper clip 1 + eps_high (0.2, as clip_eps: symmetric)
    mu=1,  # GRPO update passes over each batch of rollouts (1: on-policy, ratio 1)
    loss_agg="grpo",  # "grpo" (per sequence), "dapo" (per token), "dr_grpo" (constant)
    adv_scale="group",  # "group" (std of the group), "batch", "none" (Dr. GRPO)
    correct_weight=1.0,  # reward = correct_weight * exact match + format_weight * format
    format_weight=0.1,
)
#< L13
#> L14 align-config
DEFAULTS.update(
    lora_rank=0,  # > 0: train a LoRA adapter on the init model instead of every weight (lesson 14)
    lora_alpha=16.0,
    lora_targets="all-linear",
)
#< L14
#> L11 align

# -----------------------------------------------------------------------------
# Sequence log-probabilities: how likely the model finds an answer


def token_logprobs(model, ids, logits=None):
    """log p(ids[:, t+1] | ids[:, :t+1]) for every position: (B, T) -> (B, T-1), fp32.

    Entry j is the log-probability of token j+1, read from the logits at
    position j: everything in this file indexed (B, T-1) means "the action
    ids[:, j+1] taken in the state ids[:, :j+1]". logits: those (B, T-1, V)
    when the caller has them already (the reward model's kept unembedding).
    """
    if logits is None:
        logits, _ = model(ids[:, :-1])  # (B, T-1, V): the last position predicts nothing we have
    # subtle: log_softmax in fp32. In bf16 a log-probability of -0.01 has ~2 significant
    # digits, and DPO subtracts two sums of hundreds of them.
    logp = F.log_softmax(logits.float(), dim=-1)  # (B, T-1, V)
    return logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)


#> L11 logprobs exercise
def sequence_logprobs(model, ids, mask):
    """(summed, per_token): log p of the completion tokens only.

    ids, mask: (B, T), mask 1 on the completion (answer) tokens, 0 on the prompt
    and on padding. Returns summed (B,) = sum over completion tokens of
    log p(token | everything before it), and per_token (B, T-1) aligned with
    ids[:, 1:] (see token_logprobs), zero off the completion.
    Example: ids [[p, p, a1, a2, pad]], mask [[0, 0, 1, 1, 0]] ->
    summed = log p(a1 | p p) + log p(a2 | p p a1).
    Padding goes on the right: the model is causal, so a pad token can change
    nothing that comes before it.
    """
    per_token = token_logprobs(model, ids) * mask[:, 1:]  # (B, T-1)
    return per_token.sum(-1), per_token
#< L11


def pad_batch(seqs, value=0):
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
    ids = pad_batch([p[0] for p in pairs] + [p[2] for p in pairs])
    mask = pad_batch([p[1] for p in pairs] + [p[3] for p in pairs])
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
# DPO (and PPO, GRPO) measure the policy against a frozen reference: the SFT
# model it started from. Two ways to have it on a CPU:
#   "copy":       a frozen copy in eval mode, run on every batch: twice the
#                 weights in memory and one more forward per step;
#   "precompute": the reference never changes, and at step 0 it *is* the
#                 policy, so its log-probs of a fixed dataset can be computed
#                 once before training and stored: one forward per pair in
#                 total, no second model. (Works for DPO's fixed pairs, not for
#                 PPO/GRPO, whose samples are new each step.)
REFERENCES = ["precompute", "copy"]
#< L11
#> L14 reference
# Lesson 14 adds a third, "lora" (python align.py config/dpo.py --lora_rank=8
# --reference=lora): when only a LoRA adapter trains, the policy with its
# adapters switched off *is* the init model -- no copy, no precompute.
REFERENCES.append("lora")
#< L14
#> L11 align


def frozen_copy(model):
    """A copy of `model` that never trains: eval mode, no gradients."""
    ref = copy.deepcopy(model).eval()
    return ref.requires_grad_(False)


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
#< L11
#> L14 reference


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
#> L11 align


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

    def step(i, optimizer):
        idx = batch_indices(len(train), cfg["batch_size"], i, cfg["seed"])
        ids, mask = collate_pairs([train[j] for j in idx], device)
        loss, metrics = dpo_step(policy, ids, mask, ref_logps(train, idx, ref_train), cfg)
        update(optimizer, loss, cfg["grad_clip"])
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


def update(optimizer, loss, grad_clip):
    """One optimizer step on `loss`, gradients clipped to a global norm of grad_clip.

    Under torchrun every process has computed its gradient on its own batch; the
    all-reduce makes each process step with the mean, so the copies stay equal.
    (DDP does this inside backward(); here the policy, the critic and generate()
    are simpler to keep unwrapped.)
    """
    optimizer.zero_grad(set_to_none=True)  # None, not zeros: frees memory, skips a fill
    loss.backward()
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if dist.is_initialized():
        for p in params:
            dist.all_reduce(p.grad)  # a sum (gloo has no AVG): divide by the process count
            p.grad /= dist.get_world_size()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
#< L11
#> L12 ppo

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


def values(critic, ids):
    """The critic's V(state) for every action position: (B, T) -> (B, T-1), aligned
    with token_logprobs (entry j values the prefix ids[:, :j+1])."""
    return critic(ids[:, :-1])[0][..., 0].float()


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


# -----------------------------------------------------------------------------
# KL to the reference, estimated from samples (Schulman 2020, "Approximating KL
# divergence"). KL(pi || ref) = E_{y~pi}[log pi(y) - log ref(y)] is a sum over
# the whole vocabulary at every step; from the sampled tokens alone:
#   k1 = log pi - log ref              unbiased, but negative on some samples;
#   k3 = (ref/pi) - 1 - log(ref/pi)    unbiased too (E_pi[ref/pi] = 1), and >= 0
#        on every sample (x - 1 >= log x), with a lower variance when pi ~ ref.


#> L12 kl exercise
def kl_estimate(logp, ref_logp, kind="k1"):
    """Per-token estimate of KL(pi || ref) at sampled tokens; same shape as logp.

    Example: logp = log 0.5, ref_logp = log 0.25 -> k1 = log 2 = 0.693,
    k3 = 0.5 - 1 + log 2 = 0.193.
    """
    log_ratio = ref_logp - logp  # log(ref / pi)
    if kind == "k1":
        return -log_ratio
    if kind == "k3":
        return torch.exp(log_ratio) - 1 - log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}; choose k1 or k3")
#< L12


def masked_mean(x, mask):
    """Mean of x over the positions where mask is 1 (0 if there are none)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x, mask, eps=1e-8):
    """(x - mean) / std over the valid positions only, zero elsewhere. Padding and
    prompt positions must not pull the statistics; std is Bessel-corrected."""
    mean = masked_mean(x, mask)
    var = ((x - mean) ** 2 * mask).sum() / (mask.sum() - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + eps) * mask


# -----------------------------------------------------------------------------
# Generalized advantage estimation (Schulman et al. 2016)
#
# The advantage A_t says how much better action t was than the critic expected.
# The one-step TD error delta_t = r_t + gamma V_{t+1} - V_t is low-variance but
# biased by the critic's errors; the Monte Carlo return minus V_t is unbiased but
# noisy. GAE averages the k-step estimates with weights lambda^k:
#     A_t = delta_t + gamma lambda A_{t+1}
# lambda = 0 gives the TD error, lambda = 1 the Monte Carlo return minus V_t.


#> L12 gae exercise
def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """(advantages, returns), each (B, T) like the inputs, zero where mask is 0.

    rewards, values: (B, T) per action position; mask: 1 on the response's
    actions. After the last valid action the episode is over: V = 0 there.
    Example (one row, gamma = 1, lam = 1): rewards [0, 0, 1], values [.5, .5, .5]
    -> advantages [.5, .5, .5] (the return 1 minus V), returns [1, 1, 1].
    """
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(B, device=rewards.device)  # V_{t+1}; 0 past the end
    next_adv = torch.zeros(B, device=rewards.device)  # A_{t+1}
    for t in reversed(range(T)):  # backwards: A_t needs A_{t+1}
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = adv * mask[:, t]
        # A masked position passes zeros back: the last valid action sees V = 0, A = 0
        # after it, and nothing past the mask (padding, garbage) leaks in.
        next_value = values[:, t] * mask[:, t]
        next_adv = advantages[:, t]
    returns = (advantages + values) * mask  # the critic's regression target
    return advantages, returns
#< L12


# -----------------------------------------------------------------------------
# The PPO losses (Schulman et al. 2017)


#> L12 ppo-loss exercise
def ppo_policy_loss(logp, old_logp, advantages, mask, clip_eps=0.2):
    """Clipped surrogate: (loss, clip_fraction, approx_kl), token means over mask.

    ratio = pi / pi_old per token. loss = max(-A ratio, -A clip(ratio, 1-eps, 1+eps)):
    once the ratio has moved past the clip range in the direction A pushes it
    (up for A > 0, down for A < 0), the clipped term wins and its gradient is 0
    -- the update cannot run away from the policy that sampled the data.
    At ratio 1 the gradient is -A grad log pi: the vanilla policy gradient.
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_frac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(kl_estimate(logp, old_logp, "k3"), mask)  # pi_old -> pi drift
    return loss, clip_frac, approx_kl


def ppo_value_loss(values, old_values, returns, mask, clip_value=0.2):
    """0.5 max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2), mean over mask:
    the critic's step is limited like the policy's."""
    clipped = old_values + torch.clamp(values - old_values, -clip_value, clip_value)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)
#< L12


# -----------------------------------------------------------------------------
# Verifiable rewards: is the answer right?


def parse_number(text):
    """The first integer in a reply, or None. '  -12 ' -> -12; '42 apples' -> 42."""
    m = re.search(r"-?\d+", text)
    return int(m.group()) if m else None


def normalize(text):
    """Lower case, single spaces, no surrounding spaces or final full stop."""
    return " ".join(text.lower().split()).rstrip(".")


def correct(reply, answer):
    """1.0 if the reply answers right, else 0.0. Integer answers compare as numbers
    (trailing text allowed: the format reward handles rambling), others as
    normalised strings."""
    if re.fullmatch(r"-?\d+", answer.strip()):
        return float(parse_number(reply) == int(answer))
    return float(normalize(reply) == normalize(answer))


# -----------------------------------------------------------------------------
# Rollouts: sample answers with the KV cache


@torch.no_grad()
def rollout(policy, prompt, n, max_new_tokens, eos_id, temperature=1.0, generator=None):
    """n sampled answers to one prompt -> (ids (n, T), mask (n, T-1), ended (n,)).

    One prompt per call: every row has the same prompt length, so the batch
    needs no left padding and no attention mask (model.generate has none).
    mask is 1 on the answer's tokens up to and including the first eos_id,
    aligned with token_logprobs; ended says whether eos_id was emitted.
    """
    max_new_tokens = min(max_new_tokens, policy.cfg.block_size - len(prompt))
    x = torch.tensor([prompt] * n, device=policy.lm_head.weight.device)  # (n, P)
    training = policy.training
    ids = policy.generate(x, max_new_tokens, temperature=temperature, eos_id=eos_id, generator=generator)
    policy.train(training)  # generate() switched to eval mode
    # subtle: generate runs under inference_mode; its tensors cannot enter autograd
    # (embedding backward saves them) until cloned outside it.
    ids = ids.clone()
    P = len(prompt)
    is_eos = ids[:, P:] == eos_id  # (n, L); after the first eos, generate repeats it
    after_end = (is_eos.cumsum(-1) - is_eos.int()) > 0  # strictly after the first eos
    mask = torch.zeros(n, ids.size(1) - 1, device=ids.device)
    mask[:, P - 1:] = (~after_end).float()  # action j is token j+1: answers start at P-1
    return ids, mask, is_eos.any(-1)


def merge_rollouts(rolls):
    """Rollouts of different prompts -> one right-padded batch (ids, mask, ended)."""
    T = max(r[0].size(1) for r in rolls)
    ids = torch.cat([F.pad(r[0], (0, T - r[0].size(1))) for r in rolls])
    mask = torch.cat([F.pad(r[1], (0, T - 1 - r[1].size(1))) for r in rolls])
    return ids, mask, torch.cat([r[2] for r in rolls])


def answers(ids, mask, eos_id):
    """The answer tokens of each row (without the final eos), as lists of ints."""
    out = []
    for row, m in zip(ids[:, 1:].tolist(), mask.tolist()):
        out.append([t for t, keep in zip(row, m) if keep and t != eos_id])
    return out


def sample_and_score(policy, examples, reward_fn, cfg, eos_id, generator):
    """samples_per_prompt answers to each example -> (ids, mask, ended, rewards):
    one batch, right-padded, and reward_fn(answer_ids, ended, example) of each row."""
    G = cfg["samples_per_prompt"]
    ids, mask, ended = merge_rollouts([rollout(policy, ex["prompt"], G, cfg["max_new_tokens"], eos_id,
                                               cfg["temperature"], generator) for ex in examples])
    rows = zip(answers(ids, mask, eos_id), ended.tolist(), [ex for ex in examples for _ in range(G)])
    return ids, mask, ended, [reward_fn(*row) for row in rows]


# -----------------------------------------------------------------------------
# One PPO iteration: sample, score, estimate advantages, update


def ppo_iteration(policy, critic, ref, examples, score_fn, optimizer, cfg, eos_id, generator):
    """Rollouts for `examples` (dicts with "prompt" ids), then ppo_epochs of updates.

    score_fn(answer_ids, ended, example) -> float: the task's score of one answer
    (a rule, or the reward model). Returns the iteration's metrics.
    """
    ids, mask, ended, scores = sample_and_score(policy, examples, score_fn, cfg, eos_id, generator)
    scores = torch.tensor(scores)
    scores = scores - cfg["nonend_penalty"] * (~ended).float()  # an answer must end
    with torch.no_grad():  # the behaviour policy, the reference and the critic, frozen now
        old_logp = token_logprobs(policy, ids) * mask
        ref_logp = token_logprobs(ref, ids) * mask
        old_values = values(critic, ids) * mask
    # Rewards per token (InstructGPT): -beta KL_t everywhere, plus the score at the
    # last answer token. The leash is part of the reward, so the critic learns it too.
    kl = kl_estimate(old_logp, ref_logp, cfg["kl_estimator"]) * mask
    rewards = -cfg["kl_coef"] * kl
    rewards[torch.arange(len(ids)), last_index(mask)] += scores
    advantages, returns = gae(rewards, old_values, mask, cfg["gamma"], cfg["lam"])
    advantages = whiten(advantages, mask)  # one scale for every batch: a steadier step size
    stats = []
    for _ in range(cfg["ppo_epochs"]):
        order = torch.randperm(len(ids), generator=generator)
        for mb in order.split(cfg["minibatch_size"]):
            logp = token_logprobs(policy, ids[mb])
            pg_loss, clip_frac, approx_kl = ppo_policy_loss(logp, old_logp[mb], advantages[mb], mask[mb],
                                                            cfg["clip_eps"])
            vf_loss = ppo_value_loss(values(critic, ids[mb]), old_values[mb], returns[mb], mask[mb],
                                     cfg["clip_value"])
            update(optimizer, pg_loss + cfg["vf_coef"] * vf_loss, cfg["grad_clip"])
            stats.append((pg_loss.item(), vf_loss.item(), clip_frac.item(), approx_kl.item()))
    pg, vf, cf, ak = (sum(s[i] for s in stats) / len(stats) for i in range(4))
    valid = mask.bool()
    explained = 1 - (returns - old_values)[valid].var() / returns[valid].var().clamp(min=1e-8)
    k1 = kl_estimate(old_logp, ref_logp, "k1") * mask  # logged as k1 whatever the penalty uses
    return {"score": scores.mean().item(), "kl": k1.sum(-1).mean().item(),
            "policy_loss": pg, "value_loss": vf, "clip_frac": cf, "approx_kl": ak,
            # -log pi of sampled tokens averages to the entropy: a free Monte Carlo estimate
            "entropy": -masked_mean(old_logp, mask).item(), "explained_var": explained.item(),
            "length": mask.sum(-1).mean().item(), "ended": ended.float().mean().item()}


# -----------------------------------------------------------------------------
# The reward model's and PPO's part of the run


def load_reward_model(path, device):
    """A reward model saved by `align.py config/reward.py`, frozen."""
    from model import CausalLM, ModelConfig

    ckpt = load_checkpoint(Path(path) / "ckpt.pt" if Path(path).is_dir() else path, device)
    if not ckpt.get("scalar_head"):
        raise ValueError(f"{path} is not a reward model; train one: python align.py config/reward.py")
    rm = with_scalar_head(CausalLM(ModelConfig(**ckpt["model_config"])), ckpt.get("keep_lm", False))
    rm.load_state_dict(ckpt["model"])
    return frozen_copy(rm.to(device))


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
    rm = with_scalar_head(policy, keep_lm=cfg["rm_nll_coef"] > 0)
    rm.train()

    def scores(pairs, idx):
        ids, mask = collate_pairs([pairs[j] for j in idx], device)
        out = rm(ids)[0]  # (2b, T, 1) or, keep_lm, (2b, T, 1 + V)
        r = reward_scores(rm, ids, mask, out)  # (2b,): chosen, then rejected
        return r[:len(idx)], r[len(idx):], (ids, mask, out)

    def step(i, optimizer):
        idx = batch_indices(len(train), cfg["batch_size"], i, cfg["seed"])
        rc, rr, (ids, mask, out) = scores(train, idx)
        loss = reward_model_loss(rc, rr)
        # The chosen half: -log p of each answer token, mean over all of them in the batch
        # (DPO's RPO term averages per answer first; for 2-10 token answers they differ little).
        if cfg["rm_nll_coef"]:
            logp = token_logprobs(rm, ids[:len(idx)], logits=out[:len(idx), :-1, 1:])  # (b, T-1)
            loss = loss - cfg["rm_nll_coef"] * masked_mean(logp, mask[:len(idx), 1:])
        update(optimizer, loss, cfg["grad_clip"])
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


def read_prompts(path, tok, task):
    """RL prompts from a chat JSONL: each conversation's first question of the task
    ("arith": an integer answer; "story": any other), the reference answer beside it."""
    examples = []
    for chat in read_conversations(path):
        k = next(i for i, m in enumerate(chat) if m["role"] == "assistant")
        answer = chat[k]["content"]
        if (task == "arith") == bool(re.fullmatch(r"-?\d+", answer.strip())):
            examples.append({"prompt": list(tok.render_conversation(chat[:k], for_completion=True)[0]),
                             "answer": answer})
    if not examples:
        raise ValueError(f"{path} holds no {task!r} questions")
    return examples


def setup_rl(policy, tok, cfg, device, log):
    """What PPO and GRPO share: prompts of the task, the end token, the frozen reference."""
    examples = read_prompts(cfg["prompts"], tok, cfg["task"])
    log(f"{cfg['prompts']}: {len(examples):,} {cfg['task']} prompts")
    eos_id = tok.special_tokens[chat_end(tok)]  # <|assistant_end|>, or a real model's end token
    if cfg["reference"] == "precompute":  # the default is DPO's; samples are new each step
        cfg = {**cfg, "reference": "copy"}
    ref = make_reference(policy, cfg, device)

    def batch(i):  # prompts of iteration i, and its sampling noise: a function of (seed, i)
        idx = batch_indices(len(examples), cfg["prompts_per_iter"], i, cfg["seed"])
        return [examples[j] for j in idx], torch.Generator(device).manual_seed(cfg["seed"] + i)

    return examples, eos_id, ref, batch


def setup_ppo(policy, tok, cfg, device, log):
    examples, eos_id, ref, batch = setup_rl(policy, tok, cfg, device, log)
    if cfg["reward"] == "model":
        rm = load_reward_model(cfg["reward_init"], device)

        def score(answer, ended, ex):  # the sequence the reward model was trained on
            ids = ex["prompt"] + answer + [eos_id] * ended
            x = torch.tensor([ids], device=device)
            return reward_scores(rm, x, torch.ones_like(x)).item()
    elif cfg["reward"] == "rule":
        def score(answer, ended, ex):
            return correct(tok.decode(answer), ex["answer"])
    else:
        raise ValueError(f"unknown reward {cfg['reward']!r}; choose rule or model")
    # The critic: a copy of the SFT model with a scalar head. A separate network
    # (not a second head on the policy's trunk) costs a second model, but the value
    # loss cannot pull the policy's features around -- on a ~1M-parameter model the
    # copy is cheap. The head starts at 0: V = 0 until the first returns come in.
    critic = with_scalar_head(policy)

    def step(i, optimizer):
        prompts, generator = batch(i)
        return ppo_iteration(policy, critic, ref, prompts, score, optimizer, cfg, eos_id, generator)

    return {"module": policy, "policy": policy, "step": step, "evaluate": dict,
            "params": list(policy.parameters()) + list(critic.parameters()),
            "extra": {"critic": critic}, "plot": ["score", "kl"]}
#< L12
#> L13 grpo

# -----------------------------------------------------------------------------
# GRPO (Shao et al. 2024, DeepSeekMath): PPO without the critic
#
# Sample a group of G answers to each prompt, score each with a rule, and use
# the reward relative to the group as every token's advantage:
#     A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4)
# The group mean replaces the critic's baseline: no value model to train, no
# GAE. A group whose answers all score the same (all right or all wrong) has
# A = 0 for every answer: it teaches nothing and its compute is wasted (DAPO's
# dynamic sampling resamples such groups).


#> L13 advantages exercise
def grpo_advantages(rewards, group_size, scale="group"):
    """Group-relative advantages: rewards (B,) in consecutive groups -> (B,).

    scale "group": divide by the group's (unbiased) std + 1e-4, as the paper;
    "batch": by the whole batch's std (TRL's scale_rewards="batch");
    "none": only subtract the group mean (Dr. GRPO, Liu et al. 2025): dividing
    by the std up-weights groups whose answers barely differ (nearly always or
    nearly never right), a bias towards too-easy and too-hard prompts.
    Example: rewards [1, 0, 0, 1, 1, 1], group_size 3 -> groups [1, 0, 0]
    (mean 1/3, std 0.577) and [1, 1, 1] -> [1.155, -0.577, -0.577, 0, 0, 0].
    """
    r = rewards.view(-1, group_size).float()  # (n_groups, G)
    centred = r - r.mean(-1, keepdim=True)
    if scale == "group":
        centred = centred / (r.std(-1, keepdim=True) + 1e-4)
    elif scale == "batch":
        centred = centred / (rewards.float().std() + 1e-4)
    elif scale != "none":
        raise ValueError(f"unknown advantage scale {scale!r}; choose group, batch or none")
    return centred.reshape(-1)  # (B,)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, eps_low=0.2, eps_high=0.2, beta=0.0,
              agg="grpo", max_len=None):
    """The GRPO objective (DeepSeekMath eq. 3, with k3 for the KL, eq. 4) as a loss.

    logp, old_logp, ref_logp, mask: (B, T) per token; advantages (B,), one per
    answer, the same for all its tokens. Per token:
      -min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A) + beta k3(pi, ref)
    Aggregated over the answer tokens by `agg`:
      "grpo":    mean over each answer's tokens, then over answers (the paper): a
                 token of a short answer weighs more, so long wrong answers are
                 punished less per token -- a push towards longer wrong answers;
      "dapo":    sum over all tokens / their count (DAPO): every token weighs the
                 same, but the weight still depends on the batch's total length;
      "dr_grpo": sum over all tokens / (B * max_len) (Dr. GRPO): a constant
                 divisor, no length bias at all (max_len: the generation limit).
    Returns (loss, metrics dict).
    """
    ratio = torch.exp(logp - old_logp)
    A = advantages[:, None]  # (B, 1): broadcast over the answer's tokens
    surrogate = torch.minimum(ratio * A, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * A)
    kl = kl_estimate(logp, ref_logp, "k3")
    per_token = -surrogate + beta * kl  # (B, T)
    if agg == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    elif agg == "dapo":
        loss = masked_mean(per_token, mask)
    elif agg == "dr_grpo":
        loss = (per_token * mask).sum() / (mask.size(0) * (max_len or mask.size(1)))
    else:
        raise ValueError(f"unknown loss aggregation {agg!r}; choose grpo, dapo or dr_grpo")
    with torch.no_grad():
        clipped = ((ratio < 1 - eps_low) & (A < 0)) | ((ratio > 1 + eps_high) & (A > 0))
        metrics = {"clip_frac": masked_mean(clipped.float(), mask).item(),
                   "kl_k3": masked_mean(kl, mask).item()}
    return loss, metrics
#< L13


def format_reward(reply_ids, ended, max_answer_tokens):
    """1.0 for an answer that ends (emits the end token) within max_answer_tokens
    tokens, else 0.0: a right number followed by rambling is not a clean answer."""
    return float(ended and len(reply_ids) <= max_answer_tokens)


def grpo_iteration(policy, ref, examples, reward_fn, optimizer, cfg, eos_id, generator):
    """One GRPO iteration: a group of answers per example, advantages, mu updates.

    reward_fn(answer_ids, ended, example) -> dict of reward parts ("correct",
    "format"); the reward is their weighted sum (correct_weight, format_weight).
    """
    G = cfg["samples_per_prompt"]
    ids, mask, ended, parts = sample_and_score(policy, examples, reward_fn, cfg, eos_id, generator)
    correct_r = torch.tensor([p.get("correct", 0.0) for p in parts])
    format_r = torch.tensor([p.get("format", 0.0) for p in parts])
    rewards = cfg["correct_weight"] * correct_r + cfg["format_weight"] * format_r
    advantages = grpo_advantages(rewards, G, cfg["adv_scale"])
    with torch.no_grad():
        old_logp = token_logprobs(policy, ids) * mask
        ref_logp = token_logprobs(ref, ids) * mask  # also at beta = 0: the KL is still measured
    stats = []
    for _ in range(cfg["mu"]):  # mu = 1 in one minibatch: ratio = 1, purely on-policy; a second
        # minibatch of the same pass already sees a policy one step newer (clipped where it moved)
        order = torch.randperm(len(ids), generator=generator)
        for mb in order.split(cfg["minibatch_size"]):
            logp = token_logprobs(policy, ids[mb])
            loss, m = grpo_loss(logp, old_logp[mb], ref_logp[mb], advantages[mb], mask[mb], cfg["clip_eps"],
                                cfg["eps_high"], cfg["kl_coef"], cfg["loss_agg"], cfg["max_new_tokens"])
            update(optimizer, loss, cfg["grad_clip"])
            stats.append((loss.item(), m["clip_frac"]))
    flat_groups = (rewards.view(-1, G).std(-1) == 0).float().mean()  # zero-advantage groups
    return {"reward": rewards.mean().item(), "correct": correct_r.mean().item(),
            "format": format_r.mean().item(), "zero_adv_groups": flat_groups.item(),
            "kl": (kl_estimate(old_logp, ref_logp, "k1") * mask).sum(-1).mean().item(),
            "loss": sum(s[0] for s in stats) / len(stats), "clip_frac": sum(s[1] for s in stats) / len(stats),
            "entropy": -masked_mean(old_logp, mask).item(), "length": mask.sum(-1).mean().item()}
#< L13
#> L13 grpo


def setup_grpo(policy, tok, cfg, device, log):
    examples, eos_id, ref, batch = setup_rl(policy, tok, cfg, device, log)

    def reward(answer, ended, ex):
        return {"correct": correct(tok.decode(answer), ex["answer"]),
                "format": format_reward(answer, ended, cfg["max_new_tokens"] // 2)}

    def step(i, optimizer):
        prompts, generator = batch(i)
        return grpo_iteration(policy, ref, prompts, reward, optimizer, cfg, eos_id, generator)

    return {"module": policy, "policy": policy, "step": step, "evaluate": dict,
            "plot": ["reward", "correct", "kl"]}
#< L13
#> L11 align

# -----------------------------------------------------------------------------
# The run: one loop for every method

SETUPS = {
    "dpo": setup_dpo,
    #> L12 setups
    "reward": setup_reward,
    "ppo": setup_ppo,
    #< L12
    #> L13 setups
    "grpo": setup_grpo,
    #< L13
}


def held_out_exact_match(model, tok, path, n, log):
    """Greedy exact match on the first n questions of a held-out chat JSONL (lesson 10)."""
    r = exact_match(model, tok, read_conversations(path)[:n])
    model.train()
    log(f"exact match {Path(path).stem}: {r['accuracy']:.1%} (95% CI {r['ci_low']:.1%}-{r['ci_high']:.1%}, n={r['n']})")
    return {k: r[k] for k in ("accuracy", "ci_low", "ci_high", "n")}


def train(cfg, log=print):
    """Run cfg["method"] from cfg["init"]; returns {"step", "before", "after", "seconds"}."""
    if cfg["method"] not in SETUPS:
        raise ValueError(f"unknown method {cfg['method']!r}; choose one of {sorted(SETUPS)}")
    t_start = time.time()
    ddp, rank, world, device, why = setup_device(cfg)
    master = rank == 0  # only one process evaluates, logs and writes files
    log = log if master else (lambda *a, **k: None)
    autocast, scaler, precision = setup_precision(device, cfg["dtype"])
    if scaler.is_enabled():  # fp16 (an older GPU): update() has no loss scaling, small gradients would vanish
        autocast, precision = contextlib.nullcontext(), "float32 (fp16 needs loss scaling, which align.py omits)"
    log(f"device: {why}; precision: {precision}")
    refresh_data_on_rank0(cfg, ddp, master)
    out = Path(cfg["out_dir"] or f"out/{cfg['method']}")
    ckpt = load_checkpoint(out / "ckpt.pt", device) if cfg["resume"] else None  # fail fast
    if ckpt:  # the keys that may change on a resume; any other difference is refused
        check_resume(ckpt, {**cfg, "out_dir": str(out)}, {"resume", "max_iters", "log_interval",
                                                           "eval_interval", "eval_examples", "device"})
    torch.manual_seed(cfg["seed"])
    policy, tok, _ = load_run(cfg["init"], device)
    #> L14 lora
    adapter = None
    if cfg["lora_rank"]:  # only the adapter trains; the init model underneath stays as it was
        if cfg["method"] == "reward":
            raise ValueError("lora_rank: the reward model trains every weight (its checkpoint is "
                             "read as a plain model); use lora_rank=0")
        if peft.lora_modules(policy):
            raise ValueError(f"{cfg['init']} is a LoRA run; align from a full fine-tune, or train "
                             "this run's adapter further with lora_rank=0")
        lora = dict(r=cfg["lora_rank"], alpha=cfg["lora_alpha"], targets=cfg["lora_targets"], qlora=False)
        peft.apply_adapter(policy, lora)  # A's init draws from the seed set above: reproducible
        adapter = peft.adapter_checkpoint(policy, lora, cfg["init"])  # hashes the init once
    #< L14
    policy.train()
    run = SETUPS[cfg["method"]](policy, tok, cfg, device, log)
    optimizer = torch.optim.AdamW(run.get("params", run["module"].parameters()), lr=cfg["lr"],
                                  weight_decay=cfg["weight_decay"], betas=(0.9, 0.95))
    task = "story" if cfg["method"] == "dpo" else cfg["task"]
    step, before = 0, None
    if ckpt:
        #> L14 lora-resume
        if adapter:  # the checkpoint holds the adapter alone: the rest is the init model's
            if ckpt["lora"]["base_sha256"] != adapter["lora"]["base_sha256"]:
                raise ValueError(f"{cfg['init']} changed since this run began (SHA-256 differs): the "
                                 "adapter would sit on another model; restore it or use another --out_dir")
            ckpt["model"] = {**run["module"].state_dict(), **ckpt["model"]}
        #< L14
        step, before = resume_training(ckpt, run["module"], optimizer), ckpt["before"]
        for name, module in run.get("extra", {}).items():
            module.load_state_dict(ckpt[name])
        log(f"resumed from {out / 'ckpt.pt'} at step {step}")

    def evaluate(final):  # the method's own held-out number; exact match at the start and end
        result = run["evaluate"]()
        if run["policy"] is not None and final and cfg["eval_examples"]:
            result["exact_match"] = held_out_exact_match(run["policy"], tok, cfg[f"eval_{task}"],
                                                         cfg["eval_examples"], log)
        return result

    if master and before is None:
        log("before:")
        before = evaluate(True)
        log(f"  {before}")

    def checkpoint():
        if master:
            extra = {name: m.state_dict() for name, m in run.get("extra", {}).items()}
            # chat: a policy (not the reward model) answers through the template, so chat.py
            # and eval.py open it in chat mode, as they do lesson 10's checkpoint.
            state = training_state(run["module"], optimizer, step, cfg, tok, before=before,
                                   chat=cfg["method"] != "reward", **extra, **run.get("checkpoint", {}))
            #> L14 lora-checkpoint
            if adapter:  # a LoRA run: the A, B pairs and the init's hash
                state.update(adapter, model=peft.lora_state_dict(policy))
            #< L14
            save_checkpoint(out / "ckpt.pt", state)

    out.mkdir(parents=True, exist_ok=True)
    logfile = open(out / "log.jsonl", "a") if master else None
    t0, rows, row = time.time(), [], {}
    try:
        while step < cfg["max_iters"]:
            with autocast:  # each process its own batch: number (step, rank) of the stream
                rows.append(run["step"](step * world + rank, optimizer))
            step += 1
            if step % cfg["log_interval"] == 0 or step == cfg["max_iters"]:
                row = {"step": step, **{k: sum(r[k] for r in rows) / len(rows) for k in rows[0]},
                       "s_per_step": (time.time() - t0) / len(rows)}
                if step % cfg["eval_interval"] == 0 or step == cfg["max_iters"]:
                    if master:
                        row.update(evaluate(False))
                    checkpoint()
                log("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
                if master:
                    logfile.write(json.dumps(row) + "\n")
                    logfile.flush()
                t0, rows = time.time(), []
    except KeyboardInterrupt:  # Ctrl-C: keep what was learned, exit cleanly
        log(f"\ninterrupted at step {step}: saving {out / 'ckpt.pt'}")
        checkpoint()
        return {"step": step, "before": before}
    finally:
        if logfile:
            logfile.close()
    if not master:
        return {"step": step}
    log("after:")
    after = evaluate(True)
    seconds = time.time() - t_start
    log(f"  {after}\n{cfg['method']}: {step} steps in {seconds / 60:.1f} min")
    if "kl" in row:  # PPO and GRPO promise to stay near the reference
        log(f"KL to the reference at the end: {row['kl']:.3f} nats per answer "
            f"({'within' if row['kl'] <= cfg['max_kl'] else 'ABOVE'} the bound max_kl = {cfg['max_kl']})")
    (out / "eval.json").write_text(json.dumps({"before": before, "after": after, "seconds": seconds}, indent=2))
    plot(out, run["plot"])
    return {"step": step, "before": before, "after": after, "seconds": seconds}


def plot(out, keys):
    """log.jsonl -> curves.png: the method's main curves against steps."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: pip install matplotlib to get curves.png")
        return
    rows = [json.loads(line) for line in open(out / "log.jsonl")]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.5 * len(keys), 3))
    for ax, key in zip(axes, keys):
        ax.plot([r["step"] for r in rows if key in r], [r[key] for r in rows if key in r], marker=".")
        ax.set_title(key.replace("_", " "))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)  # pyplot keeps every figure until closed: a notebook's training calls pile up
    print(f"wrote {out / 'curves.png'}")


if __name__ == "__main__":
    run_main("align.py", DEFAULTS, train, sys.argv[1:])
#< L11
