#> L03 tests
"""Lesson 03: norms, MLPs, GQA and the whole model, against hand formulas."""

import math

import pytest
import torch

from model import MLP, Attention, CausalLM, ModelConfig, RMSNorm, make_norm

GPT2_STYLE = dict(pos_emb="learned", norm="layernorm", mlp="gelu", bias=True)
QWEN3_STYLE = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, qk_norm=True)


def tiny(**kw):
    return ModelConfig(**{**dict(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32), **kw})


def test_rmsnorm_and_layernorm_match_formulas():
    x = torch.randn(3, 5, 16)
    norm = RMSNorm(16, eps=1e-6)
    norm.weight.data = torch.linspace(0.5, 2, 16)
    ref = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), ref)
    ln = make_norm(tiny(norm="layernorm", bias=True), 16)
    ref = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(ln(x), ref, atol=1e-5, rtol=1e-5)


def test_mlps_match_formulas():
    x = torch.randn(2, 3, 32)
    m = MLP(tiny(mlp="swiglu"))
    silu = lambda z: z / (1 + torch.exp(-z))
    torch.testing.assert_close(m(x), (silu(x @ m.gate.weight.T) * (x @ m.up.weight.T)) @ m.down.weight.T)
    m = MLP(tiny(mlp="gelu", bias=True))
    h = x @ m.up.weight.T + m.up.bias
    gelu = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))  # GPT-2's
    torch.testing.assert_close(m(x), gelu @ m.down.weight.T + m.down.bias, atol=1e-5, rtol=1e-5)
    assert tiny(mlp="swiglu").n_inner == 96 and tiny(mlp="gelu").n_inner == 128


@pytest.mark.parametrize("n_kv_head", [1, 2])
def test_gqa_equals_mha_with_repeated_kv_heads(n_kv_head):
    """GQA with K/V heads shared by groups of query heads is MHA whose K/V projections
    repeat those heads: guards the head-to-group assignment (interleave vs tile)."""
    torch.manual_seed(0)
    gqa = Attention(tiny(n_kv_head=n_kv_head), 0)
    mha = Attention(tiny(), 0)
    rep, hs = 4 // n_kv_head, 8
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        for name in ("k_proj", "v_proj"):
            w = getattr(gqa, name).weight.view(n_kv_head, hs, 32)
            getattr(mha, name).weight.copy_(w.repeat_interleave(rep, dim=0).reshape(32, 32))
    x = torch.randn(2, 10, 32)
    torch.testing.assert_close(gqa(x), mha(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("style", [GPT2_STYLE, QWEN3_STYLE, dict(pos_emb="sinusoidal")])
def test_model_shapes_naive_equals_sdpa_and_causality(style):
    torch.manual_seed(0)
    model = CausalLM(tiny(**style)).eval()
    idx = torch.randint(0, 64, (2, 20))
    logits, loss = model(idx)
    assert logits.shape == (2, 20, 64) and logits.dtype == torch.float32 and loss is None
    model.cfg.attn_impl = "naive"
    torch.testing.assert_close(model(idx)[0], logits, atol=1e-5, rtol=1e-5)
    idx2 = idx.clone()
    idx2[:, 12] = (idx2[:, 12] + 1) % 64  # change token 12: logits before it must not move
    logits2 = model(idx2)[0]
    torch.testing.assert_close(logits2[:, :12], logits[:, :12])
    assert not torch.allclose(logits2[:, 12:], logits[:, 12:])


def test_loss_is_cross_entropy_ignoring_minus_one():
    torch.manual_seed(0)
    model = CausalLM(tiny())
    idx = torch.randint(0, 64, (2, 8))
    targets = torch.randint(0, 64, (2, 8))
    targets[0, :3] = -1
    logits, loss = model(idx, targets)
    logp = logits.log_softmax(-1)
    keep = targets != -1
    ref = -logp[keep].gather(-1, targets[keep][:, None]).mean()
    torch.testing.assert_close(loss, ref)


def test_overfits_one_batch():
    """A model that cannot drive the loss of one fixed batch towards 0 has a bug in
    its forward or backward (a wrong mask, a detached branch)."""
    torch.manual_seed(0)
    model = CausalLM(tiny(**QWEN3_STYLE))
    idx = torch.randint(0, 64, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        first = first or loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 3.5 and loss.item() < 0.2


def test_too_long_input_is_a_clear_error():
    with pytest.raises(ValueError, match="sequence of 40 tokens exceeds block_size=32"):
        CausalLM(tiny())(torch.zeros(1, 40, dtype=torch.long))
#< L03
