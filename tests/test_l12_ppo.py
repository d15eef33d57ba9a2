#> L12 tests
"""Lesson 12: reward model (align.py); KL estimators, GAE, the PPO losses, rollouts, a tiny PPO run (rl.py);
the task at the edge of skill (storyworld.WHO)."""

import json
import math
import re
import runpy
import sys

import pytest
import torch

import align
import rl
import storyworld
from conftest import ROOT
from model import CausalLM, ModelConfig
from run import load_config, load_run
from test_l11_dpo import run_cfg, tiny_run  # noqa: F401 (a fixture, shared)


def tiny_model(seed=0, vocab=16):
    torch.manual_seed(seed)
    return CausalLM(ModelConfig(vocab_size=vocab, block_size=32, n_layer=2, n_head=2, n_embd=32))


def rl_cfg(root, out, **kw):
    """rl.py's run_cfg: a tiny run from tiny_run's model, exact match on its questions."""
    return {**rl.DEFAULTS, "init": str(root / "sft"), "out_dir": str(out), "eval_story": str(root / "eval.jsonl"),
            "eval_examples": 4, "lr": 1e-3, "max_iters": 6, "log_interval": 2, "eval_interval": 3, **kw}


def updates(optimizer, grad_clip=1.0):
    """The update(loss) that rl.train hands an iteration: backward, then run.optimizer_step."""
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # fp32: scaling off
    return lambda loss: align.backward_and_step(loss, optimizer, scaler, grad_clip, 0, "ckpt.pt")


def test_gae_hand_computed_four_steps():
    """rewards [0, 0, 0, 1], values [.1, .2, .3, .4], gamma .9, lam .5, by hand:
    d3 = 1 - .4 = .6                A3 = .6
    d2 = .9 * .4 - .3 = .06         A2 = .06 + .45 * .6 = .33
    d1 = .9 * .3 - .2 = .07         A1 = .07 + .45 * .33 = .2185
    d0 = .9 * .2 - .1 = .08         A0 = .08 + .45 * .2185 = .178325
    Guards the recursion's direction, gamma vs gamma*lambda, and V = 0 at the end."""
    adv, ret = rl.gae(torch.tensor([[0.0, 0, 0, 1]]), torch.tensor([[0.1, 0.2, 0.3, 0.4]]),
                         torch.ones(1, 4), gamma=0.9, lam=0.5)
    assert torch.allclose(adv, torch.tensor([[0.178325, 0.2185, 0.33, 0.6]]))
    assert torch.allclose(ret, adv + torch.tensor([[0.1, 0.2, 0.3, 0.4]]))


def test_gae_lambda_one_is_monte_carlo_and_lambda_zero_is_td():
    """The two limits of the dial, against returns summed by hand: guards lambda applied to gamma's
    place or a missing bootstrap V_{t+1}."""
    g = torch.Generator().manual_seed(0)
    r, v = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    gamma = 0.8
    mc, _ = rl.gae(r, v, torch.ones(3, 6), gamma, lam=1.0)
    td, _ = rl.gae(r, v, torch.ones(3, 6), gamma, lam=0.0)
    for t in range(6):
        ret = sum(gamma ** k * r[:, t + k] for k in range(6 - t))
        assert torch.allclose(mc[:, t], ret - v[:, t], atol=1e-5)
        next_v = v[:, t + 1] if t < 5 else 0.0
        assert torch.allclose(td[:, t], r[:, t] + gamma * next_v - v[:, t], atol=1e-6)


def test_gae_ignores_everything_outside_the_mask():
    """A prompt before the answer and padding after it: garbage there must not leak
    into the answer's advantages, and is 0 in the output (the episode ends at the
    last valid action)."""
    g = torch.Generator().manual_seed(1)
    r, v = torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1, 1, 1.0]])
    adv, ret = rl.gae(r, v, mask, 1.0, 0.95)
    r2, v2 = r.clone(), v.clone()
    r2[mask == 0], v2[mask == 0] = 100.0, -50.0
    adv2, ret2 = rl.gae(r2, v2, mask, 1.0, 0.95)
    assert torch.allclose(adv, adv2) and torch.allclose(ret, ret2)
    assert (adv[mask == 0] == 0).all()
    alone, _ = rl.gae(r[:1, 2:5], v[:1, 2:5], torch.ones(1, 3), 1.0, 0.95)
    assert torch.allclose(adv[0, 2:5], alone[0])


def test_clipped_surrogate_gradient_is_zero_past_the_clip_in_the_pushed_direction():
    """Four tokens: (A > 0, ratio 1.5), (A < 0, ratio 0.5) are clipped -> gradient 0;
    (A > 0, ratio 0.5), (A < 0, ratio 1.5) are not (the update may undo a mistake)
    -> gradient -A ratio / N. Guards min/max swapped and clipping both ways."""
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 0.5, 1.5]])).requires_grad_()
    A = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    loss, clip_frac, _ = rl.ppo_policy_loss(logp, old, A, torch.ones(1, 4), clip_eps=0.2)
    loss.backward()
    want = torch.tensor([[0.0, 0.0, -1.0 * 0.5 / 4, 1.0 * 1.5 / 4]])
    assert torch.allclose(logp.grad, want) and clip_frac.item() == 0.5


def test_at_ratio_one_the_surrogate_is_the_vanilla_policy_gradient():
    """grad of the clipped loss == grad of -mean(A log pi) when pi == pi_old."""
    g = torch.Generator().manual_seed(2)
    logp = (-torch.rand(2, 5, generator=g)).requires_grad_()
    A, mask = torch.randn(2, 5, generator=g), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1.0]])
    rl.ppo_policy_loss(logp, logp.detach(), A, mask)[0].backward()
    vanilla = logp.detach().clone().requires_grad_()
    (-(A * vanilla * mask).sum() / mask.sum()).backward()
    assert torch.allclose(logp.grad, vanilla.grad)


def test_clipped_value_loss_matches_the_formula():
    """0.5 max of the two squared errors, by hand; the masked position (a huge error) must not
    count. Guards min for max and a clip around R instead of V_old."""
    v = torch.tensor([[0.0, 1.0, 0.5, 3.0]])
    old = torch.tensor([[0.5, 0.5, 0.5, 0.0]])
    R = torch.tensor([[1.0, 0.0, 2.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0.0]])
    want = 0
    for vi, oi, ri in zip([0.0, 1.0, 0.5], [0.5, 0.5, 0.5], [1.0, 0.0, 2.0]):
        clipped = oi + max(-0.2, min(0.2, vi - oi))
        want += 0.5 * max((vi - ri) ** 2, (clipped - ri) ** 2) / 3
    assert rl.ppo_value_loss(v, old, R, mask, 0.2).item() == pytest.approx(want)


def test_whitening_over_valid_tokens():
    """Statistics over valid tokens only: guards padding pulling the mean, and padding left non-
    zero."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 9, generator=g) * 3 + 7
    mask = (torch.rand(4, 9, generator=g) > 0.4).float()
    w = rl.whiten(x, mask)
    valid = w[mask.bool()]
    assert valid.mean().abs() < 1e-5 and valid.std().item() == pytest.approx(1.0, abs=1e-4)
    assert (w[mask == 0] == 0).all()


def test_kl_estimators_definitions_sign_and_monte_carlo():
    """k1 = log p - log q and k3 = q/p - 1 - log(q/p) per sample; k3 >= 0 everywhere;
    both average to the exact KL(p || q) of two categoricals, sampling from p."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])
    lp, lq = p.log(), q.log()
    assert torch.allclose(rl.kl_estimate(lp, lq, "k1"), lp - lq)
    assert torch.allclose(rl.kl_estimate(lp, lq, "k3"), q / p - 1 - (lq - lp))
    assert (rl.kl_estimate(lp, lq, "k3") >= 0).all() and (rl.kl_estimate(lp, lq, "k1") < 0).any()
    true_kl = (p * (lp - lq)).sum().item()
    x = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    for kind in ("k1", "k3"):
        assert rl.kl_estimate(lp[x], lq[x], kind).mean().item() == pytest.approx(true_kl, abs=0.01)
    with pytest.raises(ValueError, match="k1 or k3"):
        rl.kl_estimate(lp, lq, "k2")


def test_reward_model_loss_formula_and_score_position():
    """Bradley-Terry's -log sigmoid(r_c - r_r) by hand, and the score read at each row's last
    answer token, not at the padding after it."""
    rc, rr = torch.tensor([1.0, 0.0, -2.0]), torch.tensor([0.0, 0.0, 1.0])
    want = -sum(math.log(1 / (1 + math.exp(-(a - b)))) for a, b in zip(rc.tolist(), rr.tolist())) / 3
    assert align.reward_model_loss(rc, rr).item() == pytest.approx(want)
    # the score is read at each row's last answer token, not at the padding
    rm = align.with_scalar_head(tiny_model())
    torch.nn.init.normal_(rm.lm_head.weight)
    ids, mask = align.collate_pairs([([1, 2, 3], [0, 1, 1], [4, 5, 6, 7, 8], [0, 0, 1, 1, 1])])
    out = rm(ids)[0][..., 0]
    assert torch.allclose(align.reward_scores(rm, ids, mask), torch.stack([out[0, 2], out[1, 4]]))


def test_tiny_reward_model_separates_pairs():
    """Trained on a handful of pairs, the reward model scores every chosen answer above
    its rejected one; guards a head read at the wrong position or a flipped sign."""
    rm = align.with_scalar_head(tiny_model(seed=1))
    pairs = [([1, 2, 3], [0, 0, 1], [1, 2, 4], [0, 0, 1]), ([5, 6, 3], [0, 0, 1], [5, 6, 9], [0, 0, 1]),
             ([7, 3, 8], [0, 1, 1], [7, 4, 8], [0, 1, 1]), ([9, 9, 3, 3], [0, 0, 1, 1], [9, 9, 4], [0, 0, 1])]
    ids, mask = align.collate_pairs(pairs)
    opt = torch.optim.AdamW(rm.parameters(), lr=3e-3)
    for _ in range(40):
        r = align.reward_scores(rm, ids, mask)
        loss = align.reward_model_loss(r[:4], r[4:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    r = align.reward_scores(rm, ids, mask)
    assert (r[:4] > r[4:]).all()


def test_reward_model_nll_term_is_the_chosen_answers_cross_entropy(tiny_run, tmp_path):
    """keep_lm: the score is a new row in front of the unembedding, which is kept as it
    was; the first step's loss is ln 2 (both scores 0) plus the coefficient times the
    mean cross-entropy of the chosen answers' tokens under the SFT model."""
    root, tok = tiny_run
    cfg = run_cfg(root, tmp_path, method="reward", rm_nll_coef=0.5)
    policy = load_run(root / "sft", "cpu")[0]
    run = align.setup_reward(policy, tok, cfg, "cpu", log=lambda *a: None)
    rm = run["module"]
    ids = torch.tensor([[1, 2, 3, 4]])
    out = rm(ids)[0]
    assert out.shape == (1, 4, 1 + policy.cfg.vocab_size) and out[..., 0].eq(0).all()
    assert torch.allclose(out[..., 1:], policy(ids)[0], atol=1e-6)
    pairs = align.read_preferences(cfg["data"], tok, 64)
    nll, n = 0.0, 0
    for j in align.batch_indices(len(pairs), cfg["batch_size"], 0, cfg["seed"]).tolist():
        chosen, mask = torch.tensor([pairs[j][0]]), torch.tensor(pairs[j][1][1:], dtype=torch.bool)
        ce = torch.nn.functional.cross_entropy(policy(chosen)[0][0, :-1], chosen[0, 1:], reduction="none")
        nll, n = nll + ce[mask].sum().item(), n + mask.sum().item()
    loss = run["step"](0, lambda loss: None)["loss"]  # update: none, the first step's loss only
    assert loss == pytest.approx(math.log(2) + 0.5 * nll / n, rel=1e-5)


def test_sampled_exact_match_counts_prompts_with_a_right_sample_and_right_samples(monkeypatch):
    """pass@k and mean@k from k scored samples per example, grouped per example in order:
    [1, 0, 0], [0, 0, 0], [1, 1, 1] -> pass@3 2/3, mean@3 4/9. The rule that scores them
    sees the decoded answer and the example's reference."""
    scripted = iter([1.0, 0, 0, 0, 0, 0, 1, 1, 1])
    seen = []

    def sample_and_score(policy, examples, score, cfg, eos_id, generator):
        assert cfg["samples_per_prompt"] == 3
        seen.append(score([5], True, {"answer": "five"}))  # decode(5) -> "five": right
        return None, None, None, [next(scripted) for _ in range(3 * len(examples))]

    monkeypatch.setattr(rl, "sample_and_score", sample_and_score)
    r = rl.sampled_exact_match(None, [{}] * 3, 3, rl.DEFAULTS, 0, None, decode=lambda ids: "Five.")
    assert r == {"pass_at_k": pytest.approx(2 / 3), "mean_at_k": pytest.approx(4 / 9), "k": 3} and seen == [1.0]


def test_rollout_masks_the_answer_up_to_the_first_end_token():
    """The response mask, row by row against the sampled ids: answer tokens through the first end
    token, nothing of the prompt or of the repeated end tokens; the ids are usable in autograd."""
    model = tiny_model(seed=2, vocab=6)
    g = torch.Generator().manual_seed(0)
    ids, mask, ended = rl.rollout(model, [1, 2, 3], 16, 8, eos_id=5, generator=g)
    assert ids.shape[0] == 16 and mask.shape == (16, ids.size(1) - 1) and ids[:, :3].eq(torch.tensor([1, 2, 3])).all()
    for row, m, e in zip(ids.tolist(), mask.tolist(), ended.tolist()):
        answer = row[3:]
        stop = answer.index(5) + 1 if 5 in answer else len(answer)
        assert m == [0.0] * 2 + [1.0] * stop + [0.0] * (len(answer) - stop)
        assert e == (5 in answer)
    assert ended.any() and not ended.all()  # both cases were exercised
    align.next_token_logprobs(model, ids).sum().backward()  # cloned out of inference mode: trainable


def test_verifiable_answers_parse_numbers_and_strings():
    """Edge cases of the rule reward: spaces, trailing text, no answer, negatives."""
    assert rl.parse_number("  -12 ") == -12 and rl.parse_number("42 apples") == 42
    assert rl.parse_number("no idea") is None
    assert rl.correct(" 42", "42") == 1.0 and rl.correct("42 because 6*7", "42") == 1.0
    assert rl.correct("-7", "-7") == 1.0 and rl.correct("7", "-7") == 0.0
    assert rl.correct("", "3") == 0.0 and rl.correct("3 4", "34") == 0.0
    assert rl.correct("  the  Park.", "the park") == 1.0 and rl.correct("the park and", "the park") == 0.0


def test_tiny_ppo_raises_the_reward_of_saying_a_token():
    """Toy rule reward: the fraction of answer tokens equal to 4. A few PPO iterations
    from a random model must raise the mean score clearly; the KL to the reference grows
    from 0, so the penalty is live."""
    policy = tiny_model(seed=4, vocab=8)
    ref, critic = align.frozen_copy(policy), align.with_scalar_head(policy)
    cfg = {**rl.DEFAULTS, "samples_per_prompt": 8, "max_new_tokens": 6, "nonend_penalty": 0.0,
           "minibatch_size": 16, "ppo_epochs": 2, "kl_coef": 0.01}
    opt = torch.optim.AdamW(list(policy.parameters()) + list(critic.parameters()), lr=1e-2)
    examples = [{"prompt": [1, 2]}, {"prompt": [3, 1, 2]}]
    score = lambda answer, ended, ex: sum(t == 4 for t in answer) / 6  # noqa: E731
    g = torch.Generator().manual_seed(0)
    history = [rl.ppo_iteration(policy, critic, ref, examples, score, updates(opt), cfg, 7, g) for _ in range(12)]
    assert history[0]["kl"] == pytest.approx(0, abs=1e-5)
    assert history[-1]["score"] > history[0]["score"] + 0.3 and history[-1]["kl"] > 0
    assert {"clip_frac", "approx_kl", "entropy", "value_loss", "explained_var", "length"} <= history[0].keys()



@pytest.mark.parametrize("rm_nll_coef", [0.0, 0.3])
def test_reward_then_ppo_commands_run_end_to_end(tiny_run, tmp_path, rm_nll_coef):
    """The reward method saves a scalar-head checkpoint (with the kept unembedding or
    without) that PPO's --reward=model loads; PPO logs its metrics (KL starts at 0:
    policy == reference) and writes curves.png."""
    root, _ = tiny_run
    quiet = dict(log=lambda *a: None)
    rm = align.train(run_cfg(root, tmp_path / "reward", method="reward", rm_nll_coef=rm_nll_coef), **quiet)
    assert rm["before"]["pair_acc"] == 0  # the zero head ties every pair (learning: the test above)
    loaded = align.load_reward_model(tmp_path / "reward", "cpu")  # the head rebuilt as it was trained
    assert loaded.lm_head.out_features == 1 + loaded.cfg.vocab_size * (rm_nll_coef > 0)
    cfg = rl_cfg(root, tmp_path / "ppo", method="ppo", reward="model", reward_init=str(tmp_path / "reward"),
                  prompts=str(root / "eval.jsonl"), task="story", max_iters=2, log_interval=1,
                  prompts_per_iter=2, samples_per_prompt=2, max_new_tokens=4, ppo_epochs=1)
    res = rl.train(cfg, **quiet)
    log = [json.loads(line) for line in open(tmp_path / "ppo" / "log.jsonl")]
    assert res["step"] == 2 and log[0]["kl"] == pytest.approx(0, abs=1e-4) and "exact_match" in res["after"]
    assert {"score", "clip_frac", "approx_kl", "entropy", "value_loss", "explained_var", "length"} <= log[0].keys()
    assert (tmp_path / "ppo" / "curves.png").exists() and "critic" in torch.load(tmp_path / "ppo" / "ckpt.pt")
    with pytest.raises(ValueError, match="not a reward model"):
        align.load_reward_model(root / "sft", "cpu")
    with pytest.raises(ValueError, match="is a reward model .*not a model that writes text"):
        load_run(tmp_path / "reward")  # chat.py, eval.py or --init=out/reward: one clear line


@pytest.mark.parametrize("argv,want", [
    (["align.py", "config/ppo.py"], "method 'ppo' is trained by rl.py: python rl.py config/ppo.py"),
    (["align.py", "config/dpo.py", "--method=ppo"], "method 'ppo' is trained by rl.py: python rl.py "
                                                    "config/dpo.py --method=ppo"),
    (["rl.py", "config/reward.py"], "method 'reward' is trained by align.py: python align.py config/reward.py")])
def test_a_method_of_the_other_file_names_the_command_to_run(monkeypatch, argv, want):
    """PPO and GRPO left align.py for rl.py: the old command (or a preference method given
    to rl.py) ends in one line naming the right one, not in a list of unknown config keys."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(argv[0], run_name="__main__")
    assert stop.value.code == want


def test_edge_tasks_ask_what_the_story_text_says():
    """For random seeds, the answers against the story's own words, read with regular
    expressions instead of its facts: the friend is the one who "had lost" the object of the
    answer ("Zoe the rabbit looked sad: she had lost her kite."); the hero is the first
    character introduced, of the kind in the control's answer, and a story whose two
    characters are of one kind gets no control question."""
    introduced = r"an? (\w+) (?:named|called) (\w+)|(\w+) was an? (\w+) who"
    lost = r"(\w+) the \w+ (?:was \w+ because|looked \w+:) \w+ had lost \w+ (\w+)"
    skipped = 0
    for seed in (0, 7, 2024):
        sets = storyworld.edge_sets(seed, train_stories=30, val_stories=30, prompts=30)
        texts = [s.text for s in storyworld.stories(seed, 0, 30)]
        assert [c[0]["content"].split("\n", 1)[1] for c in sets["lost"]] == texts
        for chat in sets["lost"]:
            friend, thing = re.search(lost, chat[0]["content"]).groups()
            assert chat[0]["content"].startswith(f"Question: What did {friend} lose?\n")
            assert re.fullmatch(rf"{friend} lost (?:his|her) {thing}\.", chat[1]["content"])
        for story in storyworld.stories(seed, 0, 30):
            (k1, n1), (k2, n2) = [(m[0] or m[3], m[1] or m[2]) for m in re.findall(introduced, story.text)]
            qa = storyworld.hero_kind_question(story)
            assert qa == (None if k1 == k2 else (f"What kind of animal or person was {n1}?", f"a {k1}"))
            skipped += qa is None
        assert len(sets["herokind"]) == 30 - sum(storyworld.hero_kind_question(s) is None
                                                 for s in storyworld.stories(seed, 0, 30))
    assert 0 < skipped < 20  # kinds repeat in about 1 story in 15


def test_edge_sets_split_by_story_and_the_checker_wants_the_whole_answer():
    """RL's prompts are about training stories, the held-out sets about held-out ones, one
    question each. The rule reward: right, right up to case and the full stop, the story's
    other object, the right answer with words after it (wrong: it must stop)."""
    sets = storyworld.edge_sets(7, train_stories=40, val_stories=10, prompts=20)
    story_of = lambda chat: chat[0]["content"].split("\n", 1)[1]  # noqa: E731
    held = [s.text for s in storyworld.stories(7, 40, 10)]
    assert [story_of(c) for c in sets["eval_lost"]] == held
    assert {story_of(c) for c in sets["eval_herokind"]} <= set(held)
    assert not {story_of(c) for c in sets["lost"] + sets["herokind"]} & set(held)
    assert rl.correct("Omar lost his drum.", "Omar lost his drum.") == 1.0
    assert rl.correct(" omar lost his drum", "Omar lost his drum.") == 1.0
    assert rl.correct("Omar lost his kite.", "Omar lost his drum.") == 0.0
    assert rl.correct("Omar lost his drum. He was sad.", "Omar lost his drum.") == 0.0


def config_trains_on_written_sets(name):
    """A RL config's prompts and its task's held-out file are sets that `python data/prepare.py
    sft` writes (data/sft/<set>.jsonl), from lesson 10's model; the prompts are about training
    stories only, even when there are fewer of them than the prompts asked for."""
    cfg = load_config(ROOT / "config" / name, rl.DEFAULTS)
    sets = storyworld.sft_sets(7, train_stories=30, val_stories=5)
    prompts, held_out = (re.fullmatch(r"data/sft/(\w+)\.jsonl", cfg[k]) for k in ("prompts", f"eval_{cfg['task']}"))
    assert prompts and held_out and {prompts[1], held_out[1]} <= sets.keys() and cfg["init"] == "out/sft"
    story_of = lambda chat: chat[0]["content"].split("\n", 1)[1]  # noqa: E731
    assert {story_of(c) for c in sets[prompts[1]]} <= {s.text for s in storyworld.stories(7, 0, 30)}
    assert len(sets[held_out[1]]) <= 5 < len(sets[prompts[1]])


def test_ppo_config_trains_on_sets_lesson_10_data_writes():
    config_trains_on_written_sets("ppo.py")

#< L12
