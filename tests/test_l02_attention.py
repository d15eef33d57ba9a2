#> L02 tests
"""Lesson 02: positions and causal attention, against formulas and torch's own op."""

import math

import pytest
import torch
import torch.nn.functional as F

from model import (apply_rope, causal_mask, merge_heads, naive_attention, repeat_kv,
                   rope_cos_sin, sdpa_attention, sinusoidal_positions, split_heads)

from conftest import run_doctests


def qkv(B=2, nh=4, nkv=4, Tq=16, Tk=16, hs=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, nh, Tq, hs, generator=g), torch.randn(B, nkv, Tk, hs, generator=g),
            torch.randn(B, nkv, Tk, hs, generator=g))


@pytest.mark.parametrize("nkv", [4, 2, 1])  # MHA, GQA, MQA
def test_naive_attention_equals_sdpa(nkv):
    """The written-out softmax(qk^T/sqrt(d))v must equal PyTorch's fused kernel to 1e-5."""
    q, k, v = qkv(nkv=nkv)
    ours = naive_attention(q, repeat_kv(k, 4 // nkv), repeat_kv(v, 4 // nkv), causal_mask(16, 16))
    torch.testing.assert_close(ours, sdpa_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_attention_with_fewer_queries_than_keys_uses_bottom_right_mask():
    """Decoding with a cache: 3 new queries over 10 keys. Guards the SDPA trap where
    is_causal=True aligns the triangle top-left and hides most of the past."""
    q, k, v = qkv(Tq=3, Tk=10)
    ours = sdpa_attention(q, k, v)
    full_q = torch.cat([torch.zeros(2, 4, 7, 8), q], dim=2)  # same queries at positions 7..9
    ref = F.scaled_dot_product_attention(full_q, k, v, is_causal=True)[:, :, 7:]
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(naive_attention(q, k, v, causal_mask(3, 10)), ref, atol=1e-5, rtol=1e-5)
    wrong = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert not torch.allclose(wrong, ref, atol=1e-3)  # the trap is real
    assert causal_mask(2, 4).tolist() == [[True, True, True, False], [True, True, True, True]]


def test_attention_is_causal():
    """Changing the key/value at position t must not change outputs before t."""
    q, k, v = qkv()
    out = naive_attention(q, k, v, causal_mask(16, 16))
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 9], v2[:, :, 9] = 5.0, -5.0
    out2 = naive_attention(q, k2, v2, causal_mask(16, 16))
    torch.testing.assert_close(out[:, :, :9], out2[:, :, :9])
    assert not torch.allclose(out[:, :, 9:], out2[:, :, 9:])


def test_rope_equals_complex_rotation_and_preserves_norms():
    """RoPE pairs channel i with i + hs/2 and multiplies (x_i + i x_{i+hs/2}) by e^(i t w_i)."""
    T, hs, theta = 12, 8, 10000.0
    x = torch.randn(2, 3, T, hs)
    cos, sin = rope_cos_sin(T, hs, theta)
    ours = apply_rope(x, cos, sin)
    w = theta ** (-torch.arange(0, hs, 2).float() / hs)  # (hs/2,)
    angle = torch.arange(T).float()[:, None] * w  # (T, hs/2)
    z = torch.complex(x[..., : hs // 2], x[..., hs // 2:]) * torch.polar(torch.ones_like(angle), angle)
    torch.testing.assert_close(ours, torch.cat([z.real, z.imag], dim=-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(ours[:, :, 0], x[:, :, 0])  # position 0: no rotation


def test_rope_scores_depend_only_on_relative_position():
    """q_m . k_n after RoPE is a function of m - n: the same pair of vectors at (5, 2)
    and at (9, 6) gives the same score."""
    hs = 16
    cos, sin = rope_cos_sin(16, hs)
    q, k = torch.randn(hs), torch.randn(hs)
    rot = lambda x, t: apply_rope(x.view(1, 1, 1, hs), cos[t:t + 1], sin[t:t + 1]).flatten()
    torch.testing.assert_close(rot(q, 5) @ rot(k, 2), rot(q, 9) @ rot(k, 6), atol=1e-5, rtol=1e-5)


def test_sinusoidal_positions_formula():
    pe = sinusoidal_positions(50, 16)
    assert pe.shape == (50, 16)
    assert pe[0, 0::2].abs().max() == 0 and (pe[0, 1::2] == 1).all()  # sin 0, cos 0
    t, i = 7, 3
    assert math.isclose(pe[t, 2 * i].item(), math.sin(t / 10000 ** (2 * i / 16)), abs_tol=1e-6)
    assert math.isclose(pe[t, 2 * i + 1].item(), math.cos(t / 10000 ** (2 * i / 16)), abs_tol=1e-6)


def test_split_and_merge_heads_roundtrip():
    x = torch.arange(2 * 5 * 12.0).view(2, 5, 12)
    h = split_heads(x, 3)
    assert h.shape == (2, 3, 5, 4)
    torch.testing.assert_close(h[1, 2, 4], x[1, 4, 8:12])  # head 2 owns channels 8..11
    torch.testing.assert_close(merge_heads(h), x)
    assert repeat_kv(h, 2).shape == (2, 6, 5, 4) and torch.equal(repeat_kv(h, 2)[:, 1], h[:, 0])


def test_docstring_examples():
    """The >>> examples lesson 02 wrote run as printed."""
    run_doctests(causal_mask)
#< L02
