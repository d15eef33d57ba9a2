#> L15 tests
"""Lesson 15: the online softmax, flash attention forward/backward against SDPA, the Triton
kernel under Triton's CPU interpreter, and model.py's attn_impl switch."""

import functools
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import kernels as K
from model import CausalLM, ModelConfig, causal_mask, naive_attention, repeat_kv

from conftest import run_doctests


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tile loops run many tiny ops; on a busy 2-core machine a second thread only adds
    thread-pool synchronisation (this file took 78 s with two threads, 11 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sdpa(q, k, v, causal):
    """The reference: PyTorch's fused attention, bottom-right causal mask from model.py."""
    mask = causal_mask(q.size(2), k.size(2)) if causal else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def qkv(B, nh, nkv, Tq, Tk, hs, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda h, T: torch.randn(B, h, T, hs, generator=g, dtype=dtype).requires_grad_()
    return make(nh, Tq), make(nkv, Tk), make(nkv, Tk)


# -----------------------------------------------------------------------------
# The online softmax


@pytest.mark.parametrize("block", [1, 3, 8, 100])
def test_online_softmax_equals_softmax_on_hard_rows(block):
    """Guards the rescaling l e^(m - m'): a wrong or missing rescale shows on rows whose max
    arrives late, on huge values (overflow without the max), tiny ones, and -inf entries,
    including a first block of only -inf (e^(-inf - -inf) = nan if not handled)."""
    ninf = float("-inf")
    x = torch.tensor([
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 50.0],  # max in the last block
        [1e4, -1e4, 3e3, 1e4, 0.0, 2.0, -5.0, 9e3],  # e^1e4 overflows any naive sum
        [1e-30, -1e-30, 0.0, 1e-38, 2e-30, 0.0, 0.0, -3e-38],  # nearly uniform
        [ninf, ninf, ninf, ninf, 1.0, ninf, 2.0, 3.0],  # masked entries, leading -inf block
        [5.0, ninf, -3.0, ninf, ninf, ninf, ninf, ninf],  # -inf after the max
    ])
    torch.testing.assert_close(K.online_softmax(x, block), torch.softmax(x, -1), rtol=1e-6, atol=0)
    torch.testing.assert_close(K.online_softmax(x.double(), block), torch.softmax(x.double(), -1))


def test_online_softmax_batched_and_all_masked_row():
    """A row of only -inf has no softmax: nan, as torch gives, not a silent 0 or 1/n;
    leading dims are batch dims."""
    x = torch.randn(2, 3, 17, generator=torch.Generator().manual_seed(0)) * 20
    x[1, 2] = float("-inf")
    torch.testing.assert_close(K.online_softmax(x, 5), torch.softmax(x, -1), equal_nan=True)
    assert K.online_softmax(x, 5)[1, 2].isnan().all()


# -----------------------------------------------------------------------------
# Tiles and the causal diagonal


@pytest.mark.parametrize("Tq, Tk, bq, bk", [(8, 8, 4, 4), (7, 7, 2, 3), (5, 13, 4, 4), (1, 9, 16, 2),
                                             (257, 257, 64, 32), (30, 70, 7, 11)])
@pytest.mark.parametrize("causal", [True, False])
def test_key_tiles_cover_exactly_the_mask_and_skip_empty_tiles(Tq, Tk, bq, bk, causal):
    """Rebuilding the visibility matrix from the tiles must give model.causal_mask (bottom-right)
    or all-ones; no visited tile may be wholly masked (wasted work) and every skipped one must be."""
    seen = torch.zeros(Tq, Tk, dtype=torch.int)
    for i0 in range(0, Tq, bq):
        i1 = min(i0 + bq, Tq)
        for j0, j1, mask in K.key_tiles(i0, i1, Tq, Tk, bk, causal):
            tile = torch.ones(i1 - i0, j1 - j0, dtype=torch.bool) if mask is None else mask
            assert tile.any(), f"visited a fully masked tile rows {i0}:{i1} keys {j0}:{j1}"
            seen[i0:i1, j0:j1] += tile
    want = causal_mask(Tq, Tk) if causal else torch.ones(Tq, Tk, dtype=torch.bool)
    assert torch.equal(seen, want.int())  # each visible pair exactly once, nothing else


# -----------------------------------------------------------------------------
# Forward and backward against SDPA


GRID = [(T, T) for T in (1, 7, 64, 257)] + [(1, 64), (7, 64), (40, 257)]  # (Tq, Tk); Tq < Tk: a cache


@pytest.mark.parametrize("Tq, Tk", GRID)
@pytest.mark.parametrize("nh, nkv", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("causal", [True, False])
def test_flash_forward_and_backward_equal_sdpa(Tq, Tk, nh, nkv, causal):
    """fp32 to 1e-5: output and dQ, dK, dV for causal/non-causal, MHA/GQA/MQA, T in {1, 7, 64, 257}
    and Tq < Tk. Tiles 16 x 24 divide none of the lengths, so ragged last tiles, diagonal tiles
    and (GQA) gradients summed over a group are all exercised."""
    q, k, v = qkv(2, nh, nkv, Tq, Tk, 16)
    dout = torch.randn(2, nh, Tq, 16, generator=torch.Generator().manual_seed(1))
    ours = K.flash_attention(q, k, v, causal, block_q=16, block_k=24)
    ref = sdpa(q, k, v, causal)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    for g_ours, g_ref, name in zip(torch.autograd.grad(ours, (q, k, v), dout),
                                   torch.autograd.grad(ref, (q, k, v), dout), "qkv"):
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"d{name}: {m}")


def test_default_tiles_and_logsumexp():
    """With the default tile sizes, and L = log sum_j e^(S_ij) checked against torch.logsumexp
    of the masked scores: the backward rebuilds P from L, so a wrong L is a wrong gradient."""
    q, k, v = qkv(1, 4, 2, 200, 300, 32)
    o, L = K.flash_forward(q.detach(), k.detach(), v.detach(), causal=True)
    torch.testing.assert_close(o, sdpa(q, k, v, True).detach(), rtol=1e-5, atol=1e-5)
    s = q @ repeat_kv(k, 2).transpose(-2, -1) / 32 ** 0.5
    s = s.masked_fill(~causal_mask(200, 300), float("-inf"))
    torch.testing.assert_close(L, torch.logsumexp(s, -1).detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_gradcheck_fp64(causal):
    """Finite differences in fp64 check the backward's equations themselves (not just agreement
    with another implementation): GQA, Tq < Tk, tiles of 2 x 3."""
    q, k, v = qkv(1, 2, 1, 5, 7, 4, dtype=torch.float64)
    fn = functools.partial(K.flash_attention, causal=causal, block_q=2, block_k=3)
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_query_block_after_a_cache_is_bottom_right_aligned():
    """The last 5 queries against all 12 keys (decoding with a KV cache) must equal the last 5 rows
    of full causal attention, and model.naive_attention with causal_mask: guards a top-left
    triangle (SDPA's is_causal convention), which is wrong whenever Tq < Tk."""
    q, k, v = qkv(1, 2, 2, 12, 12, 8)
    full = K.flash_attention(q, k, v, True, block_q=4, block_k=4)
    last = K.flash_attention(q[:, :, -5:], k, v, True, block_q=4, block_k=4)
    torch.testing.assert_close(last, full[:, :, -5:], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(last, naive_attention(q[:, :, -5:], k, v, causal_mask(5, 12)))


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op returns while active."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(getattr(self, "largest", 0), t.numel())
        return out


def test_no_T_by_T_tensor_forward_or_backward():
    """The point of the lesson: no op in the forward or the backward may produce a (Tq, Tk) score
    matrix; the largest tensor is O(T hs) (Q, K, V, O, their gradients) or one tile."""
    B, nh, T, hs, bq, bk = 1, 2, 256, 16, 64, 64
    q, k, v = qkv(B, nh, nh, T, T, hs)
    with LargestTensor() as watch:
        K.flash_attention(q, k, v, True, bq, bk).sum().backward()
    assert watch.largest <= max(B * nh * T * hs, B * nh * bq * bk)
    with LargestTensor() as watch:  # the check itself can fail: the naive path is caught
        sdpa(q, k, v, True).sum()
        naive_attention(q, k, v, causal_mask(T, T))
    assert watch.largest >= B * nh * T * T


def test_bad_shapes_fail_with_a_clear_message():
    q, k, v = qkv(1, 3, 2, 4, 4, 8)
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        K.flash_attention(q, k, v)
    q, k, v = qkv(1, 2, 2, 6, 4, 8)
    with pytest.raises(ValueError, match="Tq <= Tk"):
        K.flash_attention(q, k, v, causal=True)


# -----------------------------------------------------------------------------
# The Triton kernel, on the CPU through Triton's interpreter


@pytest.fixture
def interpreted(monkeypatch):
    """Run Triton kernels on the CPU in Triton's interpreter (numpy), before kernels.triton_kernels
    first imports triton and builds the kernels.

    subtle: triton.language's own helpers (tl.max, tl.sum, ...) are @triton.jit functions, built
    in the mode that was on when triton was first imported. In a full pytest run torch's AdamW or
    bitsandbytes imports triton before this fixture can set TRITON_INTERPRET=1; rebuild them."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    triton = pytest.importorskip("triton", reason="triton is not installed: pip install -r requirements-triton.txt")
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(triton.language.max, InterpretedFunction):
        importlib.reload(triton.language.standard)
        importlib.reload(triton.language)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("Tq, Tk, nh, nkv, causal", [(7, 7, 2, 2, True), (33, 33, 4, 2, True),
                                                     (5, 40, 2, 1, True), (20, 20, 2, 2, False)])
def test_triton_kernels_equal_pytorch_flash(interpreted, dtype, tol, Tq, Tk, nh, nkv, causal):
    """The Triton kernels (tiles 16 x 16, ragged last tiles, GQA by index, Tq < Tk) return the same
    O, L and dQ, dK, dV as flash_forward / flash_backward. bf16 runs in fp32 in the interpreter
    (its bf16 tl.dot is wrong), so there only the final rounding differs."""
    q, k, v = (t.detach() for t in qkv(2, nh, nkv, Tq, Tk, 16, dtype=dtype))
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    o, L = K.triton_forward(q, k, v, causal, 16, 16)
    o_ref, L_ref = K.flash_forward(q, k, v, causal, 16, 16)
    assert o.dtype == dtype
    torch.testing.assert_close(o, o_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(L, L_ref, rtol=1e-5, atol=1e-5)
    grads = K.triton_backward(do, q, k, v, o_ref, L_ref, causal, 16, 16)
    for g, g_ref in zip(grads, K.flash_backward(do, q, k, v, o_ref, L_ref, causal, 16, 16)):
        assert g.dtype == dtype
        torch.testing.assert_close(g, g_ref, rtol=tol, atol=2 * tol)


def test_triton_attention_gradients_and_odd_head_size(interpreted):
    """triton_attention end to end through autograd against SDPA, with a head size that is not a
    power of two (channels padded to 16 and masked) and GQA."""
    q, k, v = qkv(1, 2, 1, 9, 9, 12)
    ours, ref = K.triton_attention(q, k, v, True, 16, 16), sdpa(q, k, v, True)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(ours.sum(), (q, k, v)), torch.autograd.grad(ref.sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_triton_on_cpu_without_interpreter_says_what_to_do(interpreted, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    q, k, v = (t.detach() for t in qkv(1, 2, 2, 4, 4, 16))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        K.triton_forward(q, k, v)


# -----------------------------------------------------------------------------
# model.py's switch


def train_losses(attn_impl, steps=4, **cfg):
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32,
                                 attn_impl=attn_impl, **cfg))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    data = torch.randint(0, 64, (steps, 2, 33), generator=torch.Generator().manual_seed(1))
    losses = []
    for batch in data:
        _, loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, model


@pytest.mark.parametrize("cfg", [{}, {"n_kv_head": 2}])
def test_training_with_flash_gives_sdpas_losses(cfg):
    """A few AdamW steps of the tiny model: the same losses (1e-5) with attn_impl="flash" as with
    "sdpa", so the gradients through the model are right too; then greedy generation with the
    KV cache (Tq = 1 after a prompt) gives the same tokens."""
    flash, model_f = train_losses("flash", **cfg)
    ref, model_s = train_losses("sdpa", **cfg)
    assert flash == pytest.approx(ref, abs=1e-5)
    prompt = torch.tensor([[1, 2, 3, 4, 5]])
    assert torch.equal(model_f.generate(prompt, 10, temperature=0), model_s.generate(prompt, 10, temperature=0))


def test_model_with_triton_kernel(interpreted):
    """attn_impl="triton" through the whole model (interpreted): the same logits as "sdpa"."""
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_embd=32, attn_impl="triton"))
    idx = torch.randint(0, 64, (1, 20))
    logits, _ = model(idx)
    model.cfg.attn_impl = "sdpa"
    torch.testing.assert_close(logits, model(idx)[0], rtol=1e-5, atol=1e-5)


def test_attn_impl_is_validated():
    with pytest.raises(ValueError, match="flash"):
        ModelConfig(attn_impl="flashy")
    with pytest.raises(ValueError, match="dropout"):
        ModelConfig(attn_impl="flash", dropout=0.1)


def test_docstring_examples():
    """The >>> examples lesson 15 wrote run as printed (the Triton-free reference code)."""
    run_doctests(K.online_softmax, K.key_tiles, K.flash_forward)
#< L15
