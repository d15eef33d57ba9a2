#> L13 tests
"""Lesson 13: group-relative advantages, the GRPO loss and its aggregations, dynamic sampling,
tiny GRPO runs."""

import json
import math

import pytest
import torch

import align
import rl
from model import CausalLM, ModelConfig
from test_l11_dpo import tiny_run  # noqa: F401 (a fixture, shared)
from test_l12_ppo import config_trains_on_written_sets, rl_cfg, updates


def tiny_model(seed=0, vocab=8):
    torch.manual_seed(seed)
    return CausalLM(ModelConfig(vocab_size=vocab, block_size=32, n_layer=2, n_head=2, n_embd=32))


def test_grpo_advantages_hand_computed_two_groups():
    """Group [1, 0, 0]: mean 1/3, unbiased std sqrt(1/3); group [1, 1, 1]: all equal,
    advantage 0 (not a division by zero). Guards the biased std and mixing groups."""
    r = torch.tensor([1.0, 0, 0, 1, 1, 1])
    s = math.sqrt(1 / 3) + 1e-4
    want = torch.tensor([(2 / 3) / s, -(1 / 3) / s, -(1 / 3) / s, 0, 0, 0])
    assert torch.allclose(rl.grpo_advantages(r, 3), want)
    assert torch.allclose(rl.grpo_advantages(r, 3, "none"), torch.tensor([2 / 3, -1 / 3, -1 / 3, 0, 0, 0]))
    batch_std = math.sqrt(sum((x - 4 / 6) ** 2 for x in r.tolist()) / 5) + 1e-4
    assert torch.allclose(rl.grpo_advantages(r, 3, "batch"),
                          torch.tensor([2 / 3, -1 / 3, -1 / 3, 0, 0, 0]) / batch_std)
    with pytest.raises(ValueError, match="group, batch or none"):
        rl.grpo_advantages(r, 3, "max")


def test_mu_one_beta_zero_gradient_is_reinforce_with_group_advantages():
    """With old = the current policy (mu = 1, ratio exactly 1) and no KL, the GRPO loss's
    gradient equals REINFORCE's: -mean_i A_i mean_t grad log pi(o_it). Autograd on a
    tiny model both ways; guards a ratio that is not 1 on-policy or a KL term leaking in."""
    model = tiny_model()
    ids, mask, _ = rl.rollout(model, [1, 2, 3], 6, 5, eos_id=7, generator=torch.Generator().manual_seed(0))
    adv = rl.grpo_advantages(torch.tensor([1.0, 0, 1, 0, 0, 1]), 3)
    logp = align.next_token_logprobs(model, ids)
    loss, _ = rl.grpo_loss(logp, logp.detach(), logp.detach() - 0.3, adv, mask, beta=0.0)
    grpo = torch.autograd.grad(loss, list(model.parameters()))
    logp = align.next_token_logprobs(model, ids)
    reinforce = -(adv * (logp * mask).sum(-1) / mask.sum(-1)).mean()
    want = torch.autograd.grad(reinforce, list(model.parameters()))
    for a, b in zip(grpo, want):
        assert torch.allclose(a, b, atol=1e-6)


def test_clipping_zeroes_the_gradient_past_eps_high_and_eps_low():
    """ratio 1.25: clipped at eps_high 0.2 for A > 0, not at DAPO's 0.28; ratio 0.7:
    clipped for A < 0 (eps_low 0.2). Unclipped tokens get -A ratio / n."""
    old = torch.zeros(2, 2)
    A = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 2)
    for eps_high, grad_first in ((0.2, 0.0), (0.28, -1.25 / 2 / 2)):
        logp = torch.log(torch.tensor([[1.25, 1.0], [0.7, 1.0]])).requires_grad_()
        loss, m = rl.grpo_loss(logp, old, logp.detach(), A, mask, eps_low=0.2, eps_high=eps_high)
        loss.backward()
        want = torch.tensor([[grad_first, -1.0 / 4], [0.0, 1.0 / 4]])
        assert torch.allclose(logp.grad, want)
        assert m["clip_frac"] == (0.5 if eps_high == 0.2 else 0.25)


@pytest.mark.parametrize("agg", ["grpo", "dapo", "dr_grpo"])
def test_each_aggregation_matches_its_formula_on_ragged_lengths(agg):
    """Answers of 1, 3 and 4 tokens (and a prompt column): per-token losses written out
    with Python floats, then each normaliser by hand. Guards padding counted as tokens
    and the three divisors confused."""
    g = torch.Generator().manual_seed(1)
    logp, old, ref = (-torch.rand(3, 5, generator=g) for _ in range(3))
    A = torch.tensor([0.5, -1.0, 2.0])
    mask = torch.tensor([[0, 1, 0, 0, 0], [0, 1, 1, 1, 0], [0, 1, 1, 1, 1.0]])
    beta, lo, hi = 0.04, 0.2, 0.3
    loss, _ = rl.grpo_loss(logp, old, ref, A, mask, lo, hi, beta, agg, max_len=6)
    rows = []
    for b in range(3):
        row = []
        for t in range(5):
            if mask[b, t]:
                r = math.exp(logp[b, t] - old[b, t])
                surr = min(r * A[b].item(), min(max(r, 1 - lo), 1 + hi) * A[b].item())
                q = math.exp(ref[b, t] - logp[b, t])
                row.append(-surr + beta * (q - 1 - math.log(q)))
        rows.append(row)
    want = {"grpo": sum(sum(x) / len(x) for x in rows) / 3,
            "dapo": sum(map(sum, rows)) / sum(map(len, rows)),
            "dr_grpo": sum(map(sum, rows)) / (3 * 6)}[agg]
    assert loss.item() == pytest.approx(want, rel=1e-5)


def test_format_reward():
    """Ending, and ending within the token limit: guards rewarding answers that never stop or
    ramble on."""
    assert rl.format_reward([1, 2], True, 4) == 1.0
    assert rl.format_reward([1, 2], False, 4) == 0.0  # never ended
    assert rl.format_reward([1] * 5, True, 4) == 0.0  # rambled past the limit


def test_tiny_grpo_raises_the_reward_of_saying_a_token():
    """Toy reward: 1 if the answer contains token 4. Groups of 8 answers to two prompts;
    mean reward rises clearly; zero-advantage groups are counted."""
    policy = tiny_model(seed=5)
    ref = align.frozen_copy(policy)
    cfg = {**rl.DEFAULTS, "samples_per_prompt": 8, "max_new_tokens": 4, "minibatch_size": 16,
           "kl_coef": 0.04, "format_weight": 0.0}
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    examples = [{"prompt": [1, 2]}, {"prompt": [3, 1, 2]}]
    reward = lambda answer, ended, ex: {"correct": float(4 in answer)}  # noqa: E731
    g = torch.Generator().manual_seed(0)
    history = [rl.grpo_iteration(policy, ref, examples, reward, updates(opt), cfg, 7, g) for _ in range(15)]
    assert history[0]["clip_frac"] == 0  # mu = 1, one minibatch: on-policy, ratio 1
    assert history[-1]["reward"] > history[0]["reward"] + 0.3
    assert 0 <= history[-1]["zero_adv_groups"] <= 1 and history[-1]["kl"] > 0


def test_dynamic_sampling_leaves_out_exactly_the_groups_of_equal_rewards(monkeypatch):
    """Three prompts, groups of 4: one always right, one right on every other answer, one
    never. With dynamic_sampling only the mixed group's rows reach the updates (the prompt
    each row starts with tells them apart); without it, all twelve do. Every group equal:
    no update at all, and the iteration still reports its metrics."""
    policy = tiny_model(seed=1)
    ref = align.frozen_copy(policy)
    prompts = {"all": [1, 2], "mixed": [3, 1, 2], "none": [2, 2, 1]}
    examples = [{"prompt": p, "kind": k} for k, p in prompts.items()]
    turns = iter(range(10 ** 6))
    reward = lambda a, e, ex: {"correct": {"all": 1.0, "none": 0.0}.get(ex["kind"], float(next(turns) % 2))}  # noqa: E731
    seen, logprobs = [], rl.next_token_logprobs

    def spy(model, ids):
        seen.append(ids)
        return logprobs(model, ids)

    monkeypatch.setattr(rl, "next_token_logprobs", spy)
    cfg = {**rl.DEFAULTS, "samples_per_prompt": 4, "max_new_tokens": 3, "minibatch_size": 2, "format_weight": 0.0}
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    for dynamic, trained in ((True, [prompts["mixed"]] * 4), (False, sorted([*prompts.values()] * 4))):
        seen.clear()
        m = rl.grpo_iteration(policy, ref, examples, reward, updates(opt), {**cfg, "dynamic_sampling": dynamic},
                              7, torch.Generator().manual_seed(0))
        rows = [next(p for p in prompts.values() if row[:len(p)] == p) for ids in seen[2:] for row in ids.tolist()]
        assert sorted(rows) == trained and m["zero_adv_groups"] == pytest.approx(2 / 3)
    seen.clear()
    m = rl.grpo_iteration(policy, ref, examples[:1], reward, updates(opt), {**cfg, "dynamic_sampling": True},
                          7, torch.Generator().manual_seed(0))
    assert len(seen) == 2 and m["loss"] == 0.0 and m["zero_adv_groups"] == 1.0  # old and ref log-probs only


def test_grpo_from_an_even_start_moves_toward_the_rewarded_answer():
    """A policy whose every logit is 0 answers each of 8 tokens with probability 1/8; the
    reward is 1 for tokens 0-3, so half the samples are right at the start. After a few GRPO
    iterations the share of right first tokens, computed from the logits, is far above 1/2."""
    policy = tiny_model(seed=3)
    with torch.no_grad():
        policy.norm_f.weight.zero_()  # the last norm's gain 0: logits 0, a uniform start
    prompt = torch.tensor([[1, 2]])
    p_right = lambda: policy(prompt)[0][0, -1].softmax(-1)[:4].sum().item()  # noqa: E731
    assert p_right() == pytest.approx(0.5)
    cfg = {**rl.DEFAULTS, "samples_per_prompt": 8, "max_new_tokens": 1, "minibatch_size": 16, "format_weight": 0.0,
           "kl_coef": 0.0}
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-2)
    reward = lambda answer, ended, ex: {"correct": float(answer[:1] != [] and answer[0] < 4)}  # noqa: E731
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        rl.grpo_iteration(policy, align.frozen_copy(policy), [{"prompt": [1, 2]}] * 2, reward, updates(opt), cfg, 7, g)
    assert p_right() > 0.8


def test_grpo_config_trains_on_sets_lesson_10_data_writes():
    config_trains_on_written_sets("grpo.py")


def test_grpo_command_runs_end_to_end(tiny_run, tmp_path):
    """config/grpo.py's loop on a tiny run: logs reward parts, zero-advantage groups and
    the KL (measured at beta = 0 too), evaluates exact match before and after, writes curves.png."""
    root, _ = tiny_run
    for beta in (0.04, 0.0):
        out = tmp_path / f"grpo{beta}"
        task = "story" if beta else "lost"  # another task than the story questions: both are measured
        cfg = rl_cfg(root, out, method="grpo", prompts=str(root / "eval.jsonl"), task=task, max_iters=2,
                      eval_lost=str(root / "eval.jsonl"), log_interval=1, prompts_per_iter=2, samples_per_prompt=4,
                      max_new_tokens=4, kl_coef=beta)
        res = rl.train(cfg, log=lambda *a: None)
        log = [json.loads(line) for line in open(out / "log.jsonl")]
        assert {"reward", "correct", "format", "zero_adv_groups", "kl", "clip_frac", "entropy", "length"} <= log[0].keys()
        assert res["step"] == 2 and "exact_match" in res["before"] and (out / "curves.png").exists()
        assert ("story" in res["before"] and "story" in res["after"]) == (task == "lost")
#< L13
