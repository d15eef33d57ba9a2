#> L11 tests
"""Lesson 11: sequence log-probs, the DPO loss and its variants, the reference, a tiny DPO run."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import align
from model import CausalLM, ModelConfig
from run import load_run


def tiny_model(seed=0, vocab=16):
    torch.manual_seed(seed)
    return CausalLM(ModelConfig(vocab_size=vocab, block_size=32, n_layer=2, n_head=2, n_embd=32))


class TableModel(torch.nn.Module):
    """Logits depend only on the current token (a bigram table): every log-prob is
    known, and a token's prediction ignores everything before the previous token."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(torch.as_tensor(table, dtype=torch.float32))

    def forward(self, idx, targets=None, kv_cache=None):
        return self.table[idx], None


def logsig(x):
    return math.log(1 / (1 + math.exp(-x)))


@pytest.mark.parametrize("loss_type,smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("hinge", 0.0), ("ipo", 0.0)])
def test_dpo_loss_matches_the_formula(loss_type, smoothing):
    """Each loss written out with Python floats, pair by pair: guards sign errors,
    swapped chosen/rejected, a missing beta and smoothing applied the wrong way."""
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(6, generator=g) * 5 - 20 for _ in range(4))
    beta = 0.3
    loss, cr, rj = align.dpo_loss(pc, pr, rc, rr, beta, loss_type, smoothing)
    want = []
    for i in range(6):
        h = (pc[i].item() - pr[i].item()) - (rc[i].item() - rr[i].item())
        if loss_type == "sigmoid":
            want.append(-(1 - smoothing) * logsig(beta * h) - smoothing * logsig(-beta * h))
        elif loss_type == "hinge":
            want.append(max(0.0, 1 - beta * h))
        else:
            want.append((h - 1 / (2 * beta)) ** 2)
    assert loss.item() == pytest.approx(sum(want) / 6, rel=1e-5)
    assert torch.allclose(cr, beta * (pc - rc)) and torch.allclose(rj, beta * (pr - rr))


def test_at_the_reference_the_loss_is_ln2_and_rewards_zero():
    """policy == reference: no preference yet, sigmoid(0) = 1/2 -> ln 2; the implicit
    rewards beta log(pi/ref) are 0. Guards a reward measured without the reference."""
    lp = torch.tensor([-3.0, -7.5, -1.2])
    lr = torch.tensor([-4.0, -2.5, -9.2])
    loss, cr, rj = align.dpo_loss(lp, lr, lp.clone(), lr.clone())
    assert loss.item() == pytest.approx(math.log(2))
    assert cr.abs().max() == 0 and rj.abs().max() == 0


def test_gradient_at_the_reference_is_plus_minus_half_beta():
    """d loss / d log pi(chosen) = -beta/2, d / d log pi(rejected) = +beta/2 for one pair
    at policy == reference (autograd vs the closed form -beta sigmoid(-beta h) at h = 0).
    Guards a detached policy term or a gradient through the reference."""
    beta = 0.25
    pc = torch.tensor([-5.0], requires_grad=True)
    pr = torch.tensor([-6.0], requires_grad=True)
    loss, cr, _ = align.dpo_loss(pc, pr, torch.tensor([-5.0]), torch.tensor([-6.0]), beta)
    loss.backward()
    assert pc.grad.item() == pytest.approx(-beta / 2) and pr.grad.item() == pytest.approx(beta / 2)
    assert not cr.requires_grad  # rewards are for logging


def test_bad_loss_options_are_rejected():
    """An unknown loss_type or reference, or label smoothing where it means nothing, fails
    loudly instead of silently training plain DPO (or against a frozen copy)."""
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="loss_type"):
        align.dpo_loss(x, x, x, x, loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        align.dpo_loss(x, x, x, x, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="unknown reference 'bogus'; choose one of precompute, copy"):
        align.make_reference(None, {**align.DEFAULTS, "reference": "bogus"}, "cpu")  # DPO, PPO, GRPO alike


def test_sequence_logprobs_equals_a_per_token_loop():
    """Summed and per-token values against F.log_softmax at each position, one by one:
    guards an off-by-one between logits and targets and summing prompt tokens."""
    model = tiny_model()
    ids = torch.randint(0, 16, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(3, 10)
    mask[0, 4:] = 1
    mask[1, 2:7] = 1  # padding after 7
    mask[2, 9] = 1
    summed, per_token = align.sequence_logprobs(model, ids, mask)
    logits, _ = model(ids)
    for b in range(3):
        want = 0.0
        for t in range(1, 10):
            lp = F.log_softmax(logits[b, t - 1].double(), -1)[ids[b, t]].item()
            assert per_token[b, t - 1].item() == pytest.approx(lp * mask[b, t].item(), abs=1e-5)
            want += lp * mask[b, t].item()
        assert summed[b].item() == pytest.approx(want, abs=1e-4)


def test_sequence_logprobs_ignores_prompt_and_padding():
    """Changing padding tokens changes nothing; changing prompt tokens whose own
    probability changes (but not the answer's context, a bigram model) changes
    nothing either: prompt log-probs are not counted."""
    g = torch.Generator().manual_seed(2)
    model = TableModel(torch.randn(16, 16, generator=g))
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 0, 0]])
    mask = torch.tensor([[0, 0, 0, 0, 1, 1, 0, 0]])  # prompt 1 2 3 4, answer 5 6, padding
    base = align.sequence_logprobs(model, ids, mask)[0]
    other = ids.clone()
    other[0, :3] = torch.tensor([9, 8, 7])  # new prompt tokens; token 4 still precedes the answer
    other[0, 6:] = torch.tensor([11, 12])  # new padding
    assert torch.equal(align.sequence_logprobs(model, other, mask)[0], base)
    bigram = F.log_softmax(model.table, -1)
    assert base.item() == pytest.approx((bigram[4, 5] + bigram[5, 6]).item(), abs=1e-6)


def test_padding_on_the_right_does_not_change_a_transformer_answer():
    """The real model, batched with a longer pair: right padding must not move any
    log-prob (causality). Guards left padding or an attention mask bug."""
    model = tiny_model()
    alone = align.collate_pairs([([1, 2, 3, 4], [0, 0, 1, 1], [1, 2, 3, 5], [0, 0, 1, 1])])
    batched = align.collate_pairs([([1, 2, 3, 4], [0, 0, 1, 1], [1, 2, 3, 5], [0, 0, 1, 1]),
                                   ([7, 7, 7, 7, 7, 7, 7, 1], [0] * 6 + [1, 1], [7, 8], [0, 1])])
    a = align.sequence_logprobs(model, *alone)[0]
    b = align.sequence_logprobs(model, *batched)[0]
    assert torch.allclose(a, b[[0, 2]], atol=1e-5)


def test_chosen_and_rejected_share_one_forward():
    """dpo_step runs the model once per batch (chosen then rejected, concatenated):
    guards two forwards, and the halves being split in the wrong order."""
    model = tiny_model()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    pairs = [([1, 2, 3], [0, 1, 1], [1, 2, 4, 4], [0, 1, 1, 1]), ([5, 6], [0, 1], [5, 7], [0, 1])]
    ids, mask = align.collate_pairs(pairs)
    ref = align.sequence_logprobs(model, ids, mask)[0].detach() + torch.tensor([0.0, 0.0, 1.0, 1.0])
    cfg = dict(align.DEFAULTS)
    loss, m = align.dpo_step(model, ids, mask, ref, cfg)
    assert len(calls) == 2  # one for ref above, one in dpo_step
    # rejected reference log-probs raised by 1 -> the rejected rewards are -beta, the chosen 0
    assert m["margin"] == pytest.approx(cfg["beta"], abs=1e-5)


def test_ipo_step_uses_length_averaged_logprobs():
    """IPO compares per-token averages: the step's loss equals dpo_loss on log-probs
    divided by each answer's length, computed here by hand."""
    model = tiny_model()
    pairs = [([1, 2, 3, 4, 5], [0, 0, 1, 1, 1], [1, 2, 6], [0, 0, 1])]
    ids, mask = align.collate_pairs(pairs)
    ref = torch.tensor([-9.0, -2.0])
    cfg = {**align.DEFAULTS, "loss_type": "ipo"}
    loss, _ = align.dpo_step(model, ids, mask, ref, cfg)
    lp = align.sequence_logprobs(model, ids, mask)[0]
    want, _, _ = align.dpo_loss(lp[:1] / 3, lp[1:] / 1, ref[:1] / 3, ref[1:] / 1, cfg["beta"], "ipo")
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)


def test_rpo_adds_the_per_token_nll_of_the_chosen_answers():
    """rpo_alpha * mean over pairs of -log p(chosen) / its token count, on top of DPO."""
    model = tiny_model()
    ids, mask = align.collate_pairs([([1, 2, 3, 4], [0, 0, 1, 1], [1, 2, 5], [0, 0, 1]),
                                     ([6, 7], [0, 1], [6, 8, 9], [0, 1, 1])])
    ref = torch.tensor([-5.0, -4.0, -6.0, -3.0])
    plain, _ = align.dpo_step(model, ids, mask, ref, dict(align.DEFAULTS))
    rpo, _ = align.dpo_step(model, ids, mask, ref, {**align.DEFAULTS, "rpo_alpha": 0.5})
    lp = align.sequence_logprobs(model, ids, mask)[0]
    assert (rpo - plain).item() == pytest.approx(0.5 * -(lp[0] / 2 + lp[1] / 1).item() / 2, rel=1e-5)


def test_reference_is_frozen_and_precompute_agrees_with_the_copy():
    """The frozen copy takes no gradient and does not move when the policy trains;
    its log-probs equal the ones precomputed from the policy at step 0."""
    policy = tiny_model()
    ids, mask = align.collate_pairs([([1, 2, 3], [0, 1, 1], [1, 2, 4], [0, 1, 1])])
    pre = align.reference_logprobs(policy, ids, mask)[0]
    ref = align.frozen_copy(policy)
    assert not any(p.requires_grad for p in ref.parameters()) and not ref.training
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    align.sequence_logprobs(policy, ids, mask)[0].sum().backward()
    opt.step()
    assert torch.allclose(align.reference_logprobs(ref, ids, mask)[0], pre)
    assert not torch.allclose(align.sequence_logprobs(policy, ids, mask)[0], pre)


def test_tiny_dpo_ranks_every_chosen_answer_first():
    """A handful of pairs whose chosen answer the random model does not prefer: after
    DPO, the policy's log-prob of every chosen answer beats the rejected one."""
    policy = tiny_model(seed=3)
    pairs = [([1, 2, 3], [0, 0, 1], [1, 2, 4], [0, 0, 1]),
             ([5, 6, 7, 8], [0, 0, 1, 1], [5, 6, 9, 9], [0, 0, 1, 1]),
             ([10, 11], [0, 1], [10, 12], [0, 1]),
             ([13, 2, 14], [0, 0, 1], [13, 2, 3], [0, 0, 1]),
             ([4, 4, 15], [0, 0, 1], [4, 4, 1], [0, 0, 1])]
    # flip the pairs the model already ranks right, so there is something to learn
    ids, mask = align.collate_pairs(pairs)
    lp = align.sequence_logprobs(policy, ids, mask)[0]
    pairs = [(r, rm, c, cm) if lp[i] > lp[i + 5] else (c, cm, r, rm) for i, (c, cm, r, rm) in enumerate(pairs)]
    ids, mask = align.collate_pairs(pairs)
    ref = align.reference_logprobs(policy, ids, mask)[0]
    assert (ref[:5] < ref[5:]).all()
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    cfg = {**align.DEFAULTS, "beta": 0.5}
    for _ in range(60):
        loss, m = align.dpo_step(policy, ids, mask, ref, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    lp = align.sequence_logprobs(policy, ids, mask)[0]
    assert (lp[:5] > lp[5:]).all() and m["reward_acc"] == 1.0 and loss.item() < 0.3


# -----------------------------------------------------------------------------
# Data and the run, end to end on a tiny checkpoint


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny chat-capable run folder: BPE with the chat tokens, a 2-layer model."""
    from run import save_checkpoint
    from tokenizer import CHAT_TOKENS, BPETokenizer

    root = tmp_path_factory.mktemp("run")
    text = "Tom had a red ball. Where did Tom play? the park. What is 2 + 3? 5 " * 20
    tok = BPETokenizer(special_tokens=["<|endoftext|>"] + CHAT_TOKENS).train(text, 300)
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32))
    save_checkpoint(root / "sft" / "ckpt.pt", {"model": model.state_dict(), "model_config": model.cfg.__dict__,
                                               "tokenizer": tok.state()})
    pairs = [{"prompt": [{"role": "user", "content": f"Tom had a {c} ball. What colour?"}],
              "chosen": [{"role": "assistant", "content": c}],
              "rejected": [{"role": "assistant", "content": w}]}
             for c, w in [("red", "blue"), ("blue", "red"), ("green", "red"), ("red", "green")] * 4]
    for name in ("train", "val"):
        (root / f"{name}.jsonl").write_text("\n".join(json.dumps(p) for p in pairs) + "\n")
    (root / "eval.jsonl").write_text("\n".join(json.dumps({"messages": p["prompt"] + p["chosen"]}) for p in pairs))
    return root, tok


def test_preference_lines_in_both_formats_and_bad_lines(tiny_run, tmp_path):
    """Strings and message lists both load, the mask covers the final answer only (a
    prompt's earlier assistant turn is context), and a malformed line names its number."""
    root, tok = tiny_run
    chat = {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Tom"},
                       {"role": "user", "content": "Again"}],
            "chosen": [{"role": "assistant", "content": "red"}], "rejected": [{"role": "assistant", "content": "5"}]}
    text = {"prompt": "What is 2 + 3?", "chosen": " 5", "rejected": " 6"}
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(chat) + "\n\n" + json.dumps(text) + "\n")
    (c, cm, r, rm), (tc, tcm, tr, trm) = align.read_preferences(path, tok, 64)
    ids, _ = tok.render_conversation(chat["prompt"] + chat["chosen"])
    assert c == list(ids) and tok.decode([t for t, m in zip(c, cm) if m]) == "red<|assistant_end|>"
    assert tok.decode([t for t, m in zip(tc, tcm) if m]) == " 5" and tc[:len(tc) - sum(tcm)] == tok.encode("What is 2 + 3?")
    path.write_text(json.dumps(text) + "\n" + json.dumps({"prompt": "x", "chosen": "y"}) + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl:2: .*\"rejected\""):
        align.read_preferences(path, tok, 64)
    path.write_text(json.dumps({"prompt": "x", "chosen": [], "rejected": "z"}) + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl:1: .*all strings or all message lists"):
        align.read_preferences(path, tok, 64)


def run_cfg(root, out, **kw):
    return {**align.DEFAULTS, "init": str(root / "sft"), "out_dir": str(out), "data": str(root / "train.jsonl"),
            "val_data": str(root / "val.jsonl"), "eval_story": str(root / "eval.jsonl"), "eval_examples": 4,
            "eval_pairs": 8, "batch_size": 4, "lr": 1e-3, "max_iters": 6, "log_interval": 2, "eval_interval": 3, **kw}


@pytest.mark.parametrize("reference", ["precompute", "copy"])
def test_dpo_run_learns_and_resumes_exactly(tiny_run, tmp_path, monkeypatch, reference):
    """The command's loop end to end: it logs, checkpoints, learns the held-out pairs,
    and Ctrl-C at step 3 + --resume gives bit-identical weights to a straight run.
    Both ways of holding the reference give the same run."""
    root, _ = tiny_run
    res = align.train(run_cfg(root, tmp_path / "straight", reference=reference), log=lambda *a: None)
    assert res["after"]["pref_acc"] > 0.5 and res["before"]["pref_acc"] == 0  # a tie at step 0
    assert (tmp_path / "straight" / "eval.json").exists()
    assert load_run(tmp_path / "straight")[2]["chat"]  # chat.py and eval.py open it in chat mode
    real = align.dpo_step
    calls = []

    def interrupt(*a):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(align, "dpo_step", interrupt)
    assert align.train(run_cfg(root, tmp_path / "split", reference=reference), log=lambda *a: None)["step"] < 6
    monkeypatch.setattr(align, "dpo_step", real)
    align.train(run_cfg(root, tmp_path / "split", reference=reference, resume=True), log=lambda *a: None)
    a = torch.load(tmp_path / "straight" / "ckpt.pt")["model"]
    b = torch.load(tmp_path / "split" / "ckpt.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
#< L11
