#> L12 rl
"""
rl.py -- learning from rewards: sample answers from the chat model, score them,
and climb the score. PPO with a critic and GAE, then GRPO, both starting from
the SFT checkpoint of lesson 10.

    python rl.py config/ppo.py           # lesson 12: PPO with GAE; a rule checks the answers
    python rl.py config/ppo.py --reward=model   # ... or align.py config/reward.py's model scores them
    python rl.py config/grpo.py          # lesson 13: GRPO with verifiable rewards
    python rl.py config/grpo.py --kl_coef=0 --resume   # any key can be overridden

align.py learns from a fixed dataset of answers someone ranked; here the model
writes its own answers and a reward judges them. Lesson 12: RLHF as
InstructGPT did it -- sample, score and climb the score with PPO, a critic and
GAE, leashed to the SFT model by a KL penalty. Lesson 13: GRPO -- PPO without
the critic, advantages from a group of answers to the same prompt, rewards
from a rule that checks the answer.

Papers: Ouyang et al. 2022, "Training language models to follow instructions
with human feedback" (InstructGPT); Schulman et al. 2017, "Proximal Policy
Optimization Algorithms"; Schulman et al. 2016, "High-Dimensional Continuous
Control Using Generalized Advantage Estimation" (GAE); Shao et al. 2024,
"DeepSeekMath" (GRPO); Yu et al. 2025, "DAPO"; Liu et al. 2025, "Understanding
R1-Zero-Like Training" (Dr. GRPO).
"""

import json
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from align import (TUNE_DEFAULTS, backward_and_step, batch_indices, held_out_exact_match, last_index,
                   load_reward_model, make_reference, masked_mean, next_token_logprobs, reward_scores,
                   start_tuning, with_scalar_head)
from data.chats import read_conversations
from run import logged, plot_log, resume_training, run_main, save_checkpoint, training_state
#> L14 import
import peft
from align import start_lora
from run import LORA_DEFAULTS
#< L14

# -----------------------------------------------------------------------------
# Config: every key a run can set, with its default. A config file or
# --key=value overrides these; anything else is an error that lists them.

DEFAULTS = dict(
    method="ppo",  # "ppo" (lesson 12) or "grpo" (13)
    **TUNE_DEFAULTS,  # init, out_dir, seed, lr, ..., dtype float32: as align.py
    eval_examples=200,  # held-out questions of the task for exact match before/after
    eval_k=8,  # and samples of each at the rollout temperature, for pass@k and mean@k (0: none)
    reference="copy",  # the KL's anchor: a frozen "copy" of the init model; "lora": lesson 14
    eval_story="data/sft/eval_story.jsonl",  # held-out questions for exact match (lesson 10)
    eval_lost="data/sft/eval_lost.jsonl",  # the task at the edge of skill (storyworld.edge_sets)
    eval_herokind="data/sft/eval_herokind.jsonl",  # its control: a lookup SFT did not form
    # Rollouts and rewards
    task="story",  # the verifiable task PPO/GRPO train and test on (its eval_<task> file)
    reward="rule",  # "rule" (exact match) or "model" (the reward model at reward_init)
    reward_init="out/reward",
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
    #> L13 config
    # GRPO
    eps_high=0.2,  # DAPO's clip-higher: the upper clip 1 + eps_high (0.2, as clip_eps: symmetric)
    mu=1,  # GRPO update passes over each batch of rollouts (1: on-policy, ratio 1)
    loss_agg="grpo",  # "grpo" (per sequence), "dapo" (per token), "dr_grpo" (constant)
    adv_scale="group",  # "group" (std of the group), "batch", "none" (Dr. GRPO)
    correct_weight=1.0,  # reward = correct_weight * exact match + format_weight * format
    format_weight=0.1,
    dynamic_sampling=False,  # DAPO: leave out the groups whose answers all score the same
    #< L13
    #> L14 rl-config
    **LORA_DEFAULTS,  # lora_rank > 0: train a LoRA adapter on the init model (lesson 14)
    #< L14
)


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
    aligned with next_token_logprobs; ended says whether eos_id was emitted.
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
# The prompts: questions of the task, with the answer a rule checks


def read_prompts(path, tok):
    """RL prompts from a chat JSONL: each conversation's first question, rendered up to
    the assistant's turn, with the reference answer beside it."""
    examples = []
    for chat in read_conversations(path):  # each ends with an assistant message (checked on read)
        k = next(i for i, m in enumerate(chat) if m["role"] == "assistant")
        examples.append({"prompt": list(tok.render_conversation(chat[:k], for_completion=True)[0]),
                         "answer": chat[k]["content"]})
    if not examples:
        raise ValueError(f"{path} holds no conversations: RL prompts are chats with answers (lesson 10)")
    return examples


def sampled_exact_match(policy, examples, k, cfg, eos_id, generator, decode):
    """What RL can work with, measured before it trains: k answers to each example at the
    rollout temperature. pass@k: the share of examples with at least one right answer (a
    reward can only reinforce what some sample gets right); mean@k: the share of right
    answers (where the samples' average stands; greedy is often above it)."""
    score = lambda answer, ended, ex: correct(decode(answer), ex["answer"])  # noqa: E731
    _, _, _, scores = sample_and_score(policy, examples, score, {**cfg, "samples_per_prompt": k}, eos_id, generator)
    right = torch.tensor(scores).view(len(examples), k)  # (examples, k)
    return {"pass_at_k": right.amax(-1).mean().item(), "mean_at_k": right.mean().item(), "k": k}


def setup_rl(policy, tok, cfg, device, log):
    """What PPO and GRPO share: prompts of the task, the end token, the frozen reference."""
    examples = read_prompts(cfg["prompts"], tok)
    log(f"{cfg['prompts']}: {len(examples):,} {cfg['task']} prompts")
    eos_id = tok.special_tokens[tok.template_end]  # <|assistant_end|>, or a real model's end token
    ref = make_reference(policy, cfg, device)

    def batch(i):  # prompts of iteration i, and its sampling noise: a function of (seed, i)
        idx = batch_indices(len(examples), cfg["prompts_per_iter"], i, cfg["seed"])
        return [examples[j] for j in idx], torch.Generator(device).manual_seed(cfg["seed"] + i)

    return examples, eos_id, ref, batch


# -----------------------------------------------------------------------------
# One PPO iteration: sample, score, estimate advantages, update


def values(critic, ids):
    """The critic's V(state) for every action position: (B, T) -> (B, T-1), aligned
    with next_token_logprobs (entry j values the prefix ids[:, :j+1])."""
    return critic(ids[:, :-1])[0][..., 0].float()


def ppo_iteration(policy, critic, ref, examples, score_fn, update, cfg, eos_id, generator):
    """Rollouts for `examples` (dicts with "prompt" ids), then ppo_epochs of updates.

    score_fn(answer_ids, ended, example) -> float: the task's score of one answer
    (a rule, or the reward model); update(loss): one optimizer step on the policy
    and the critic together (train's, align.backward_and_step). Returns the
    iteration's metrics.
    """
    ids, mask, ended, scores = sample_and_score(policy, examples, score_fn, cfg, eos_id, generator)
    scores = torch.tensor(scores)
    scores = scores - cfg["nonend_penalty"] * (~ended).float()  # an answer must end
    with torch.no_grad():  # the behaviour policy, the reference and the critic, frozen now
        old_logp = next_token_logprobs(policy, ids) * mask
        ref_logp = next_token_logprobs(ref, ids) * mask
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
            logp = next_token_logprobs(policy, ids[mb])
            pg_loss, clip_frac, approx_kl = ppo_policy_loss(logp, old_logp[mb], advantages[mb], mask[mb],
                                                            cfg["clip_eps"])
            vf_loss = ppo_value_loss(values(critic, ids[mb]), old_values[mb], returns[mb], mask[mb],
                                     cfg["clip_value"])
            update(pg_loss + cfg["vf_coef"] * vf_loss)
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


def setup_ppo(policy, tok, cfg, device, log):
    """PPO's part of the run: the score (a rule or the reward model), the critic, one iteration."""
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

    def step(i, update):
        prompts, generator = batch(i)
        return ppo_iteration(policy, critic, ref, prompts, score, update, cfg, eos_id, generator)

    return {"step": step, "critic": critic, "plot": ["score", "kl"]}
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


def grpo_iteration(policy, ref, examples, reward_fn, update, cfg, eos_id, generator):
    """One GRPO iteration: a group of answers per example, advantages, mu updates.

    reward_fn(answer_ids, ended, example) -> dict of reward parts ("correct",
    "format"); the reward is their weighted sum (correct_weight, format_weight).
    update(loss): one optimizer step (train's, align.backward_and_step).
    """
    G = cfg["samples_per_prompt"]
    ids, mask, ended, parts = sample_and_score(policy, examples, reward_fn, cfg, eos_id, generator)
    correct_r = torch.tensor([p.get("correct", 0.0) for p in parts])
    format_r = torch.tensor([p.get("format", 0.0) for p in parts])
    rewards = cfg["correct_weight"] * correct_r + cfg["format_weight"] * format_r
    advantages = grpo_advantages(rewards, G, cfg["adv_scale"])
    with torch.no_grad():
        old_logp = next_token_logprobs(policy, ids) * mask
        ref_logp = next_token_logprobs(ref, ids) * mask  # also at beta = 0: the KL is still measured
    informative = rewards.view(-1, G).std(-1) > 0  # (n_groups,): neither all right nor all wrong
    rows = torch.arange(len(ids))
    if cfg["dynamic_sampling"]:
        # DAPO's dynamic sampling: a group of equal rewards has A = 0 for every answer, so it
        # only dilutes the mean over answers (a smaller step) and adds the KL term. DAPO
        # samples more prompts until the batch is full of informative groups; we leave them out.
        rows = rows[informative.repeat_interleave(G)]
    stats = []
    for _ in range(cfg["mu"] if len(rows) else 0):  # mu = 1 in one minibatch: ratio = 1, on-policy;
        # a second minibatch of the same pass already sees a policy one step newer (clipped where it moved)
        order = rows[torch.randperm(len(rows), generator=generator)]
        for mb in order.split(cfg["minibatch_size"]):
            logp = next_token_logprobs(policy, ids[mb])
            loss, m = grpo_loss(logp, old_logp[mb], ref_logp[mb], advantages[mb], mask[mb], cfg["clip_eps"],
                                cfg["eps_high"], cfg["kl_coef"], cfg["loss_agg"], cfg["max_new_tokens"])
            update(loss)
            stats.append((loss.item(), m["clip_frac"]))
    stats = stats or [(0.0, 0.0)]  # every group left out: no update this iteration
    return {"reward": rewards.mean().item(), "correct": correct_r.mean().item(),
            "format": format_r.mean().item(), "zero_adv_groups": 1 - informative.float().mean().item(),
            "kl": (kl_estimate(old_logp, ref_logp, "k1") * mask).sum(-1).mean().item(),
            "loss": sum(s[0] for s in stats) / len(stats), "clip_frac": sum(s[1] for s in stats) / len(stats),
            "entropy": -masked_mean(old_logp, mask).item(), "length": mask.sum(-1).mean().item()}


def setup_grpo(policy, tok, cfg, device, log):
    """GRPO's part of the run: the reward (right answer, clean ending), one iteration."""
    examples, eos_id, ref, batch = setup_rl(policy, tok, cfg, device, log)

    def reward(answer, ended, ex):
        return {"correct": correct(tok.decode(answer), ex["answer"]),
                "format": format_reward(answer, ended, cfg["max_new_tokens"] // 2)}

    def step(i, update):
        prompts, generator = batch(i)
        return grpo_iteration(policy, ref, prompts, reward, update, cfg, eos_id, generator)

    return {"step": step, "plot": ["reward", "correct", "kl"]}
#< L13

# -----------------------------------------------------------------------------
# The run: sample, score, update; exact match on held-out questions before and after

SETUPS = {
    "ppo": setup_ppo,
    #> L13 setups
    "grpo": setup_grpo,
    #< L13
}


def train(cfg, log=print):
    """Run cfg["method"] from cfg["init"]; returns {"step", "before", "after", "seconds"}."""
    t_start = time.time()
    (rank, world, device, log, autocast, scaler), out, ckpt, policy, tok = start_tuning(cfg, SETUPS, log)
    master, ckpt_path = rank == 0, out / "ckpt.pt"  # only one process evaluates, logs and writes files
    #> L14 lora
    adapter = start_lora(policy, cfg, ckpt)  # lora_rank > 0: only an adapter trains
    #< L14
    policy.train()
    run = SETUPS[cfg["method"]](policy, tok, cfg, device, log)
    critic = run.get("critic")  # PPO's value model, trained beside the policy; GRPO has none
    params = list(policy.parameters()) + (list(critic.parameters()) if critic else [])
    optimizer = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"], betas=(0.9, 0.95))
    step, before = 0, None
    if ckpt:
        step, before = resume_training(ckpt, policy, optimizer), ckpt["before"]
        if critic:
            critic.load_state_dict(ckpt["critic"])
        log(f"resumed from {ckpt_path} at step {step}")

    def update(loss):  # one optimizer step (policy and critic together), with run.py's guards
        backward_and_step(loss, optimizer, scaler, cfg["grad_clip"], step, ckpt_path)

    def evaluate():  # greedy exact match on held-out questions of the task, at the start and end
        if not cfg["eval_examples"]:
            return {}
        path = cfg[f"eval_{cfg['task']}"]
        result = {"exact_match": held_out_exact_match(policy, tok, path, cfg["eval_examples"], log)}
        if cfg["task"] != "story":  # and what RL must not cost: lesson 10's story questions
            result["story"] = held_out_exact_match(policy, tok, cfg["eval_story"], cfg["eval_examples"], log)
        if cfg["eval_k"]:  # the same questions sampled: the headroom a reward has to work with
            examples = read_prompts(path, tok)[:cfg["eval_examples"]]
            eos_id, generator = tok.special_tokens[tok.template_end], torch.Generator(device).manual_seed(cfg["seed"])
            with torch.no_grad():
                result["sampled"] = sampled_exact_match(policy, examples, cfg["eval_k"], cfg, eos_id, generator, tok.decode)
            s = result["sampled"]
            log(f"{Path(path).stem}: pass@{s['k']} {s['pass_at_k']:.1%}, mean@{s['k']} {s['mean_at_k']:.1%} "
                f"at temperature {cfg['temperature']} (n = {len(examples)})")
        return result

    if master and before is None:
        log("before:")
        before = evaluate()
        log(f"  {before}")

    def checkpoint():
        if master:
            # chat: the policy answers through the template, so chat.py and eval.py open it
            # in chat mode, as they do lesson 10's checkpoint.
            state = training_state(policy, optimizer, step, cfg, tok, before=before, chat=True,
                                   **({"critic": critic.state_dict()} if critic else {}))
            #> L14 lora-checkpoint
            if adapter:  # a LoRA run: the A, B pairs and the init's hash
                state.update(adapter, model=peft.lora_state_dict(policy))
            #< L14
            save_checkpoint(ckpt_path, state)

    t0, rows, row = time.time(), [], {}
    with logged(out, master, log, checkpoint, lambda: step) as run_log:  # Ctrl-C: save, exit cleanly
        while step < cfg["max_iters"]:
            with autocast:  # each process its own prompts: number (step, rank) of the stream
                rows.append(run["step"](step * world + rank, update))
            step += 1
            if step % cfg["log_interval"] == 0 or step == cfg["max_iters"]:
                row = {"step": step, **{k: sum(r[k] for r in rows) / len(rows) for k in rows[0]},
                       "s_per_step": (time.time() - t0) / len(rows)}
                if step % cfg["eval_interval"] == 0 or step == cfg["max_iters"]:
                    checkpoint()
                log("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
                run_log.write(row)
                t0, rows = time.time(), []
    if run_log.interrupted:
        return {"step": step, "before": before}
    if not master:
        return {"step": step}
    log("after:")
    after = evaluate()
    seconds = time.time() - t_start
    log(f"  {after}\n{cfg['method']}: {step} steps in {seconds / 60:.1f} min")
    if "kl" in row:  # the bound PPO and GRPO promise: near the reference (no row: no step ran)
        log(f"KL to the reference at the end: {row['kl']:.3f} nats per answer "
            f"({'within' if row['kl'] <= cfg['max_kl'] else 'ABOVE'} the bound max_kl = {cfg['max_kl']})")
    (out / "eval.json").write_text(json.dumps({"before": before, "after": after, "seconds": seconds}, indent=2))
    plot_log(out, [[key] for key in run["plot"]], x="step", name="curves.png")
    return {"step": step, "before": before, "after": after, "seconds": seconds}


if __name__ == "__main__":
    run_main("rl.py", DEFAULTS, train, sys.argv[1:], {"dpo": "align.py", "reward": "align.py"})
#< L12
