#> L04 tests
"""Lesson 04: the KV cache gives the same numbers as no cache; sampling is reproducible."""

import pytest
import torch

from model import CausalLM, KVCache, ModelConfig, one_row_matmuls, sample

STYLES = {
    "gpt2": dict(pos_emb="learned", norm="layernorm", mlp="gelu", bias=True),
    "qwen3": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, qk_norm=True),
}


def make(style, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, block_size=96, n_layer=2, n_head=4, n_embd=32, **STYLES[style], **kw)
    model = CausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than the init, so that a wrong position shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


@pytest.mark.parametrize("style", STYLES)
def test_prefill_then_decode_equals_uncached_forward(style):
    """Prefill 10 tokens, then decode 20 one at a time: every position's logits must equal
    one uncached forward over all 30 (guards position offsets and mask alignment)."""
    model = make(style)
    idx = torch.randint(0, 64, (2, 30))
    full = model(idx)[0]
    cache = KVCache(model.cfg, 2, 30)
    steps = [model(idx[:, :10], kv_cache=cache)[0]]
    steps += [model(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(10, 30)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 30


@pytest.mark.parametrize("style", STYLES)
def test_greedy_generation_with_and_without_cache_is_identical(style):
    model = make(style)
    prompt = torch.randint(0, 64, (2, 5))
    a = model.generate(prompt, 50, temperature=0, use_cache=True)
    b = model.generate(prompt, 50, temperature=0, use_cache=False)
    assert a.shape == (2, 55) and torch.equal(a, b) and torch.equal(a[:, :5], prompt)


def test_sampling_repeats_with_the_same_generator_seed():
    model = make("qwen3")
    prompt = torch.zeros(3, 1, dtype=torch.long)
    run = lambda seed: model.generate(prompt, 30, temperature=1.0, top_k=20, top_p=0.9,
                                      generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_sample_filters():
    """top_k / top_p keep exactly the tokens the definitions say; temperature 0 is argmax."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = lambda **kw: {sample(logits, generator=g, **kw).item() for _ in range(300)}
    assert sample(logits, temperature=0).tolist() == [0]
    assert draws(top_k=2) == {0, 1}
    assert draws(top_p=0.7) == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: two tokens
    assert draws(top_p=0.45) == {0}  # the top token alone reaches 0.45
    assert draws(top_p=0.81) == {0, 1, 2}
    assert draws() == {0, 1, 2, 3}


def test_stream_yields_tokens_and_stops_at_eos():
    model = make("gpt2")
    prompt = torch.randint(0, 64, (1, 4))
    greedy = model.generate(prompt, 12, temperature=0)[0, 4:].tolist()
    eos = greedy[5]
    streamed = [t.item() for t in model.stream(prompt, 12, temperature=0, eos_id=eos)]
    assert streamed == greedy[:greedy.index(eos) + 1]  # stops right after the first eos


def test_generation_past_block_size_slides_the_window():
    """With the cache full, generation continues uncached over the last block_size tokens."""
    model = make("qwen3")
    out = model.generate(torch.zeros(1, 90, dtype=torch.long), 20, temperature=0)
    assert out.shape == (1, 110)


def test_cache_memory_per_token():
    """2 (k and v) * n_layer * n_kv_head * head_dim numbers per token."""
    cfg = ModelConfig(vocab_size=64, n_layer=3, n_head=4, n_kv_head=2, n_embd=32)
    cache = KVCache(cfg, batch_size=1, max_len=10)
    assert cache.k.numel() + cache.v.numel() == 10 * 2 * 3 * 2 * 8


def test_bf16_decode_kernels_switch_back():
    """Decode steps in bf16 on a CPU turn oneDNN off (PyTorch's own kernel is faster for one
    row): guards that the global flag only changes for bf16 and one row, and is back after
    each step, even while a stream is paused between tokens or stopped early."""
    assert torch.backends.mkldnn.enabled
    cases = ((torch.bfloat16, 1, False), (torch.float32, 1, True), (torch.bfloat16, 8, True))
    for dtype, rows, inside in cases:
        with one_row_matmuls(torch.zeros(2, dtype=dtype), rows):
            assert torch.backends.mkldnn.enabled == inside
        assert torch.backends.mkldnn.enabled
    model = make("qwen3").to(torch.bfloat16)
    tokens = model.stream(torch.zeros(1, 4, dtype=torch.long), 5, temperature=0)
    next(tokens), next(tokens), next(tokens)  # two decode steps done, the stream paused
    assert torch.backends.mkldnn.enabled
    tokens.close()
    full = model.generate(torch.zeros(1, 4, dtype=torch.long), 5, temperature=0)
    assert full.shape == (1, 9) and torch.backends.mkldnn.enabled
#< L04
