#> L07 tests
"""Lesson 07: the loss and the optimizers against PyTorch's own and their update rules."""

import math

import pytest
import torch
import torch.nn.functional as F

from run import clip_grad_norm, get_lr
from pretrain import AdamW, Lion, cross_entropy, param_groups

from conftest import run_doctests


def test_cross_entropy_matches_torch_with_ignore_index():
    torch.manual_seed(0)
    logits = torch.randn(40, 17) * 5
    targets = torch.randint(0, 17, (40,))
    targets[::3] = -1
    torch.testing.assert_close(cross_entropy(logits, targets), F.cross_entropy(logits, targets, ignore_index=-1))
    big = torch.tensor([[1000.0, 0.0]])  # exp(1000) overflows; logsumexp must not
    assert math.isclose(cross_entropy(big, torch.tensor([1])).item(), 1000.0)


def two_groups(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.1, "lr": 3e-3},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0, "lr": 1e-3}]
    return model, groups


def test_adamw_matches_torch_adamw_over_50_steps():
    """Two param groups with different lr and weight decay; bias correction and decoupled
    decay must match torch.optim.AdamW to 1e-6."""
    ours_model, ours_groups = two_groups()
    ref_model, ref_groups = two_groups()
    ours = AdamW(ours_groups, betas=(0.9, 0.95), eps=1e-8)
    ref = torch.optim.AdamW(ref_groups, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    for step in range(50):
        x = torch.randn(32, 8, generator=torch.Generator().manual_seed(step))
        for model, opt in ((ours_model, ours), (ref_model, ref)):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    for a, b in zip(ours_model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_lion_follows_its_update_rule():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    m = torch.zeros(3)
    expected = p.detach().clone()
    for g in ([0.3, -0.1, 0.0], [-1.0, 0.2, 0.4]):
        p.grad = torch.tensor(g)
        opt.step()
        u = torch.sign(0.9 * m + 0.1 * torch.tensor(g))
        expected = expected - 0.1 * (u + 0.5 * expected)
        m = 0.99 * m + 0.01 * torch.tensor(g)
        torch.testing.assert_close(p.detach(), expected)


def test_param_groups_decay_only_matrices():
    model, _ = two_groups()
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() == 2 for p in decay["params"]) and len(decay["params"]) == 2
    assert all(p.dim() == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0


def test_lr_schedule_warmup_then_cosine():
    cfg = dict(lr=1.0, min_lr=0.1, warmup_iters=10, max_iters=110)
    assert get_lr(0, cfg) == pytest.approx(0.1) and get_lr(9, cfg) == pytest.approx(1.0)
    assert get_lr(10, cfg) == pytest.approx(1.0)
    assert get_lr(60, cfg) == pytest.approx(0.55)  # halfway: cos(pi/2) = 0, the mean of lr and min_lr
    assert get_lr(110, cfg) == pytest.approx(0.1) and get_lr(500, cfg) == pytest.approx(0.1)


def test_clip_grad_norm_matches_torch():
    model, _ = two_groups()
    model(torch.randn(4, 8)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    norm = clip_grad_norm(model.parameters(), 0.5)
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    ref = torch.nn.utils.clip_grad_norm_(list(model.parameters()), 0.5)
    torch.testing.assert_close(norm, ref)
    assert norm > 0.5  # it was clipped...
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert total == pytest.approx(0.5, rel=1e-4)  # ...to 0.5


def test_docstring_examples():
    """The >>> examples lesson 07 wrote run as printed."""
    run_doctests(cross_entropy)
#< L07
