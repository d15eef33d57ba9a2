"""
model.py -- a decoder-only transformer, from token ids to next-token logits.

One file builds both families of modern language models from the same parts,
switched by ModelConfig:
  GPT-2 (Radford et al. 2019): learned positions, LayerNorm, GELU MLP, biases.
  Llama / Qwen3 (Touvron et al. 2023; Qwen3 2025): RoPE, RMSNorm, SwiGLU,
  grouped-query attention, no biases, and for Qwen3 an RMSNorm on q and k.
and proves it by loading their Hugging Face checkpoints and matching the
logits of the transformers library (tests/test_l05_*).

Read it in lesson order: the token embedding (01), attention (02), the block
and the whole model (03), the KV cache and generation (04), configs, counting
and real weights (05). A tiny model runs on a CPU in milliseconds:
    cfg = ModelConfig(vocab_size=512, n_layer=2, n_head=4, n_embd=64)
    logits, loss = CausalLM(cfg)(idx, targets)   # idx, targets: (B, T) ids
"""

import contextlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Token embedding


class TokenEmbedding(nn.Embedding):
    """A (vocab_size, n_embd) table of learned vectors; row i represents token i.

    Looking up row i is the same as multiplying a one-hot vector by the table:
    onehot(idx) @ W, shape (B, T, V) @ (V, C) -> (B, T, C). The lookup skips
    the multiplication, and the gradient reaches only the rows that were used,
    so a token's vector learns only from the contexts it appears in.

    >>> emb = TokenEmbedding(10, 4)
    >>> emb(torch.tensor([[1, 2, 3]])).shape  # (B, T) ids -> (B, T, C) vectors
    torch.Size([1, 3, 4])
    """

    def __init__(self, vocab_size, n_embd):
        super().__init__(vocab_size, n_embd)
        # N(0, 0.02): GPT-2's choice; small enough that the first logits are near
        # uniform (loss ~ ln(vocab_size)) and training starts from no preference.
        nn.init.normal_(self.weight, mean=0.0, std=0.02)


#> L02 attention
# -----------------------------------------------------------------------------
# Positions: attention itself is blind to order, so we must tell it


#> L02 positions exercise
def sinusoidal_positions(T, C):
    """The fixed table of "Attention Is All You Need" (Vaswani et al. 2017), (T, C).

    PE[t, 2i] = sin(t / 10000^(2i/C)),  PE[t, 2i+1] = cos(t / 10000^(2i/C)):
    each pair of channels is a clock at its own frequency, so a shift by k
    positions is a fixed rotation of every pair, easy for a layer to read.
    """
    t = torch.arange(T, dtype=torch.float32)[:, None]  # (T, 1)
    freq = 10000.0 ** (-torch.arange(0, C, 2, dtype=torch.float32) / C)  # (C/2,)
    pe = torch.zeros(T, C)
    pe[:, 0::2] = torch.sin(t * freq)
    pe[:, 1::2] = torch.cos(t * freq)
    return pe


def rope_cos_sin(T, head_dim, theta=10000.0):
    """cos and sin tables for rotary embeddings (Su et al. 2021, RoFormer), each (T, hs).

    RoPE rotates each pair of query/key channels by an angle t * w_i, so the
    dot product q_m . k_n depends only on m - n: relative position for free.
    Frequencies w_i = theta^(-2i/hs) for i < hs/2, the same as sinusoidal.
    Layout (Llama/Qwen checkpoints): channel i pairs with channel i + hs/2
    (the "rotate-half" layout), so the angle table is [w t, w t] concatenated.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    angles = torch.outer(torch.arange(T, dtype=torch.float32), inv_freq)  # (T, hs/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hs)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate x (B, nh, T, hs) by position. With x1, x2 the two halves of hs:

        [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]

    which is the complex product (x1 + i x2) * e^(i t w), written in reals.
    A rotation: norms are preserved (tests check both facts).
    """
    x1, x2 = x.chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    rotated = torch.cat([-x2, x1], dim=-1)  # "rotate_half": multiply by i
    return (x * cos + rotated * sin).to(x.dtype)
#< L02


# -----------------------------------------------------------------------------
# Causal scaled dot-product attention, written out and fused


#> L02 attention-math exercise
def causal_mask(Tq, Tk, device=None):
    """(Tq, Tk) bool, True where query i may look at key j.

    The Tq queries are the *last* Tq of the Tk positions (with a KV cache,
    Tk = cached + new), so query i sits at position Tk - Tq + i and sees keys
    j <= Tk - Tq + i. subtle: SDPA's is_causal=True aligns the triangle to the
    top-left instead, which is wrong whenever Tq < Tk.
    >>> causal_mask(2, 3).int().tolist()
    [[1, 1, 0], [1, 1, 1]]
    """
    return torch.ones(Tq, Tk, dtype=torch.bool, device=device).tril(diagonal=Tk - Tq)


def naive_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(hs) + mask) v, every step visible.

    q: (B, nh, Tq, hs); k, v: (B, nh, Tk, hs); mask: (Tq, Tk) bool.
    Dividing by sqrt(hs) keeps the scores' variance ~1 whatever the head size,
    so softmax does not saturate into a one-hot at init (Vaswani et al. 2017).
    """
    att = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, nh, Tq, Tk)
    att = att.masked_fill(~mask, float("-inf"))  # the future gets weight exp(-inf) = 0
    att = F.softmax(att.float(), dim=-1).to(q.dtype)  # each row sums to 1
    return att @ v  # (B, nh, Tq, hs): a weighted average of the values
#< L02


def sdpa_attention(q, k, v, dropout_p=0.0):
    """The same computation, fused by PyTorch (flash / memory-efficient kernels).

    q: (B, nh, Tq, hs); k, v: (B, nkv, Tk, hs) with nh a multiple of nkv.
    enable_gqa lets a key/value head serve nh/nkv query heads without copying.
    """
    #> L08 cpu-bf16-attention
    # subtle: on a CPU, PyTorch's bf16 flash-attention backward is ~4x slower than its fp32
    # one at training shapes (B 12, 4 heads, T 64, hs 32: 4.4 ms against 1.0 on one Zen 5
    # core). So while gradients are recorded it runs on fp32 copies; the matmuls stay bf16.
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.requires_grad:
        with torch.autocast("cpu", enabled=False):  # or autocast casts them back to bf16
            return sdpa_attention(q.float(), k.float(), v.float(), dropout_p).to(q.dtype)
    #< L08
    Tq, Tk = q.size(2), k.size(2)
    if Tq == 1:  # one new token (cached decoding) is the last position: it sees every key
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, enable_gqa=True)
    if Tq == Tk:  # training, prefill: no mask tensor needed
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True,
                                              enable_gqa=True)
    mask = causal_mask(Tq, Tk, q.device)  # several new tokens after a cache: bottom-right aligned
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                          enable_gqa=True)


def split_heads(x, n_head):
    """(B, T, nh * hs) -> (B, nh, T, hs): each head attends in its own subspace."""
    B, T, _ = x.shape
    return x.view(B, T, n_head, -1).transpose(1, 2)


def merge_heads(x):
    """(B, nh, T, hs) -> (B, T, nh * hs): concatenate the heads' outputs again."""
    B, nh, T, hs = x.shape
    return x.transpose(1, 2).contiguous().view(B, T, nh * hs)


def repeat_kv(x, n_rep):
    """(B, nkv, T, hs) -> (B, nkv * n_rep, T, hs): share each K/V head among n_rep
    query heads (grouped-query attention, Ainslie et al. 2023)."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)
#< L02


#> L03 model
# -----------------------------------------------------------------------------
# The configuration


@dataclass
class ModelConfig:
    vocab_size: int = 2048
    block_size: int = 256  # longest context; positions beyond it were never trained
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # None: = n_head (MHA); 1 is MQA; between: GQA
    n_embd: int = 128
    head_dim: int | None = None  # None: n_embd // n_head (Qwen3 decouples the two)
    n_inner: int | None = None  # MLP width; None: 4 n_embd (gelu) or ~8/3 n_embd (swiglu)
    pos_emb: str = "rope"  # "learned" (GPT-2), "sinusoidal" (2017), "rope" (Llama, Qwen)
    rope_theta: float = 10000.0
    norm: str = "rmsnorm"  # "layernorm" (GPT-2) or "rmsnorm" (Llama, Qwen)
    norm_eps: float = 1e-5
    mlp: str = "swiglu"  # "gelu" (GPT-2) or "swiglu" (Llama, Qwen)
    qk_norm: bool = False  # RMSNorm on each head's q and k (Qwen3)
    bias: bool = False  # biases in Linear layers and LayerNorm (GPT-2: True)
    dropout: float = 0.0
    attn_impl: str = "sdpa"  # "naive" (the reference, written out) or "sdpa" (fused)
    #> L05 tie
    tie_embeddings: bool = True  # lm_head shares the token embedding's matrix
    #< L05

    def __post_init__(self):
        self.n_kv_head = self.n_kv_head or self.n_head
        self.head_dim = self.head_dim or self.n_embd // self.n_head
        if self.n_inner is None:  # SwiGLU has 3 matrices, GELU 2: 8/3 keeps the parameters equal
            self.n_inner = 4 * self.n_embd if self.mlp == "gelu" else 32 * math.ceil(8 * self.n_embd / 96)
        #> L05 config-checks
        # Fail at construction, with the fix, rather than with a shape error later.
        choices = {"pos_emb": ("learned", "sinusoidal", "rope"), "norm": ("layernorm", "rmsnorm"),
                   "mlp": ("gelu", "swiglu"), "attn_impl": ("naive", "sdpa")}
        #> L15 attn-impl
        choices["attn_impl"] += ("flash", "triton")  # kernels.py: tiled, O(T) memory (lesson 15)
        if self.attn_impl in ("flash", "triton") and self.dropout:
            raise ValueError(f"attn_impl={self.attn_impl!r} has no attention dropout; "
                             "set dropout=0 or use attn_impl='sdpa'")
        #< L15
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"unknown {key}={getattr(self, key)!r}; choose one of {allowed}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                             "change one (or set head_dim explicitly)")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}: "
                             "each key/value head must serve a whole group of query heads")
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE rotates channel pairs: head_dim={self.head_dim} must be even")
    #< L05


# -----------------------------------------------------------------------------
# Norms and the MLP


#> L03 norms-and-mlp exercise
class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * g   (Zhang & Sennrich 2019).

    LayerNorm without the mean subtraction and the bias: cheaper, and as good
    in practice. Computed in fp32, since squares of bf16 values lose precision.
    """

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(cfg, dim):
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps)
    # LayerNorm (Ba et al. 2016): y = (x - mean) / sqrt(var + eps) * g + b
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)


class MLP(nn.Module):
    """The position-wise feed-forward network: where most parameters live.

    gelu:   down(gelu(fc(x)))                      (GPT-2; tanh approximation)
    swiglu: down(silu(gate(x)) * up(x))            (Shazeer 2020, "GLU variants")
    The gate lets each hidden unit switch its own input off; at equal parameter
    count SwiGLU trains to a lower loss.
    """

    def __init__(self, cfg):
        super().__init__()
        self.kind = cfg.mlp
        if self.kind == "swiglu":
            self.gate = nn.Linear(cfg.n_embd, cfg.n_inner, bias=cfg.bias)
        self.up = nn.Linear(cfg.n_embd, cfg.n_inner, bias=cfg.bias)
        self.down = nn.Linear(cfg.n_inner, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):  # (B, T, C) -> (B, T, n_inner) -> (B, T, C)
        if self.kind == "swiglu":
            h = F.silu(self.gate(x)) * self.up(x)
        else:
            h = F.gelu(self.up(x), approximate="tanh")
        return self.dropout(self.down(h))
#< L03


# -----------------------------------------------------------------------------
# Attention as a module: projections, heads, GQA, QK-norm, and the cache


#> L03 attention-and-block exercise
class Attention(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        nh, nkv, hs = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        # GQA: fewer K/V heads than Q heads. The KV cache shrinks by n_head/n_kv_head.
        self.q_proj = nn.Linear(cfg.n_embd, nh * hs, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.n_embd, nkv * hs, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.n_embd, nkv * hs, bias=cfg.bias)
        self.o_proj = nn.Linear(nh * hs, cfg.n_embd, bias=cfg.bias)
        if cfg.qk_norm:  # bounds the scores q.k, which otherwise can grow and destabilise training
            self.q_norm, self.k_norm = RMSNorm(hs, cfg.norm_eps), RMSNorm(hs, cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, rope=None, kv_cache=None, mask=None):
        """x (B, T, C) -> (B, T, C). mask: None for plain causal attention; lesson 10's
        packed rows pass their own (B, 1, T, T) bool mask (True: may attend)."""
        q = split_heads(self.q_proj(x), self.cfg.n_head)  # (B, nh, T, hs)
        k = split_heads(self.k_proj(x), self.cfg.n_kv_head)  # (B, nkv, T, hs)
        v = split_heads(self.v_proj(x), self.cfg.n_kv_head)  # (B, nkv, T, hs)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:  # keys/values of all positions so far: (B, nkv, Tk, hs)
            k, v = kv_cache.update(self.layer, k, v)
        #> L10 packing
        if mask is not None:  # packed rows: SDPA with the block-diagonal mask, whatever attn_impl
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True,
                                               dropout_p=self.cfg.dropout if self.training else 0.0)
            return self.dropout(self.o_proj(merge_heads(y)))
        #< L10
        if self.cfg.attn_impl == "naive":
            n_rep = self.cfg.n_head // self.cfg.n_kv_head
            y = naive_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep),
                                causal_mask(q.size(2), k.size(2), x.device))
        #> L15 attn-impl
        elif self.cfg.attn_impl in ("flash", "triton"):
            import kernels  # here, not at the top: kernels.py imports model.py
            attend = kernels.flash_attention if self.cfg.attn_impl == "flash" else kernels.triton_attention
            y = attend(q, k, v, causal=True)  # GQA and Tq < Tk (cache) handled inside, K/V not copied
        #< L15
        else:
            y = sdpa_attention(q, k, v, self.cfg.dropout if self.training else 0.0)
        return self.dropout(self.o_proj(merge_heads(y)))  # (B, T, nh*hs) -> (B, T, C)


class Block(nn.Module):
    """Pre-norm residual block (GPT-2 onwards): x + attn(norm(x)), then x + mlp(norm(x)).

    The residual stream x passes through untouched, so gradients reach early
    layers directly; norming only the branch inputs keeps that path clean.
    """

    def __init__(self, cfg, layer):
        super().__init__()
        self.norm1, self.attn = make_norm(cfg, cfg.n_embd), Attention(cfg, layer)
        self.norm2, self.mlp = make_norm(cfg, cfg.n_embd), MLP(cfg)

    def forward(self, x, rope=None, kv_cache=None, mask=None):
        x = x + self.attn(self.norm1(x), rope, kv_cache, mask)  # tokens exchange information
        return x + self.mlp(self.norm2(x))  # each token thinks on its own
#< L03


# -----------------------------------------------------------------------------
# The whole model


class CausalLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = TokenEmbedding(cfg.vocab_size, cfg.n_embd)
        if cfg.pos_emb == "learned":
            self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        elif cfg.pos_emb == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_positions(cfg.block_size, cfg.n_embd), persistent=False)
        else:  # rope: derived from the config, so not saved with the weights
            cos, sin = rope_cos_sin(cfg.block_size, cfg.head_dim, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm_f = make_norm(cfg, cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        #> L05 tie-and-init
        if cfg.tie_embeddings:  # one matrix reads and writes tokens: saves V*C parameters
            self.lm_head.weight = self.tok_emb.weight  # (Press & Wolf 2017)
        self.apply(self._init_weights)
        #< L05

    def forward(self, idx, targets=None, kv_cache=None, segments=None):
        """idx (B, T) ids -> logits (B, T, V); loss if targets (B, T) are given.

        Targets equal to -1 are ignored (padding, prompts we do not train on).
        With kv_cache, idx holds only the new tokens and positions continue
        from the cache's length. segments (B, T): lesson 10's packed rows, the
        conversation each position belongs to (None: one sequence per row).
        """
        B, T = idx.shape
        start = 0 if kv_cache is None else kv_cache.length
        if start + T > self.cfg.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size={self.cfg.block_size}; "
                             "crop the input or use a model with a longer context")
        x = self.tok_emb(idx)  # (B, T, C)
        pos, mask = torch.arange(start, start + T, device=idx.device), None  # (T,), plain causal
        #> L10 packing
        if segments is not None:  # positions restart per conversation; attention stays inside each
            pos, mask = packed_positions(segments)  # (B, T), (B, 1, T, T)
        #< L10
        rope = None
        if self.cfg.pos_emb == "learned":
            x = x + self.pos_emb(pos)  # the rows of positions start..start+T-1: (T, C)
        elif self.cfg.pos_emb == "sinusoidal":
            x = x + self.pos_table[pos].to(x.dtype)
        else:  # (1, T, hs), or (B, 1, T, hs) per row: broadcast over the heads of (B, nh, T, hs)
            rope = (self.rope_cos[pos].unsqueeze(-3).to(x.dtype), self.rope_sin[pos].unsqueeze(-3).to(x.dtype))
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x, rope, kv_cache, mask)
        logits = self.lm_head(self.norm_f(x))  # (B, T, V)
        loss = None
        if targets is not None:  # mean over non-ignored positions of -log p(target)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1),
                                   ignore_index=-1)
        return logits, loss
    #> L04 generate

    @torch.inference_mode()  # no autograd bookkeeping at all: less overhead per step
    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None,
               generator=None, use_cache=True):
        """Yield the next token, (B,) ids, one step at a time (chat.py prints as they come).

        With the cache: one forward over the prompt ("prefill"), then one token
        per step ("decode"), each step O(T) instead of recomputing O(T^2).
        Sequences that emit eos_id keep emitting it; all done -> stop.
        """
        self.eval()
        B, T = idx.shape
        cache = None
        if use_cache:
            cache = KVCache(self.cfg, B, min(self.cfg.block_size, T + max_new_tokens),
                            idx.device, self.lm_head.weight.dtype)
            logits, _ = self(idx[:, -self.cfg.block_size:], kv_cache=cache)  # prefill
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        for step in range(max_new_tokens):
            if cache is None:  # no cache: rerun the whole (cropped) context every step
                logits, _ = self(idx[:, -self.cfg.block_size:])
            nxt = sample(logits[:, -1], temperature, top_k, top_p, generator)  # (B,)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done |= nxt == eos_id
            idx = torch.cat([idx, nxt[:, None]], dim=1)  # (B, T + step + 1)
            yield nxt
            if done.all() or step == max_new_tokens - 1:
                return
            if cache is not None and cache.length == cache.max_len:
                cache = None  # context full: fall back to a sliding window, uncached
            if cache is not None:
                with one_row_matmuls(self.lm_head.weight, nxt.size(0)):
                    logits, _ = self(nxt[:, None], kv_cache=cache)  # decode: (B, 1) -> (B, 1, V)

    def generate(self, idx, max_new_tokens, **kwargs):
        """(B, T) prompt -> (B, T + new) ids; keyword arguments as in stream()."""
        new = list(self.stream(idx, max_new_tokens, **kwargs))
        return torch.cat([idx, torch.stack(new, dim=1)], dim=1) if new else idx
    #< L04
    #> L05 count-and-load

    def _init_weights(self, module):
        """N(0, 0.02) everywhere, as GPT-2; zero biases; norms start as the identity.

        The residual stream sums 2 * n_layer branch outputs, so its variance
        grows with depth; GPT-2 scales the init of the projections that write
        into it (o_proj, down) by 1/sqrt(2 * n_layer) to keep it ~constant.
        """
        if isinstance(module, nn.Linear):
            residual = any(module is b.attn.o_proj or module is b.mlp.down for b in self.blocks)
            std = 0.02 / math.sqrt(2 * self.cfg.n_layer) if residual else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, embeddings=True):
        """Parameter count; parameters() yields a tied matrix once. embeddings=False
        leaves out the lookup tables (token, learned position), as scaling laws do;
        with tying, the output head's matrix goes with the token table."""
        n = sum(p.numel() for p in self.parameters())
        #> L14 nf4-count
        # QLoRA (peft.py) holds a frozen weight as packed 4-bit codes, a buffer: count its weights
        n += sum(math.prod(m.weight_shape) for m in self.modules() if hasattr(m, "weight_shape"))
        #< L14
        if not embeddings:
            n -= self.tok_emb.weight.numel()
            n -= self.pos_emb.weight.numel() if self.cfg.pos_emb == "learned" else 0
        return n

    def flops_per_token(self, T=None):
        """Training FLOPs per token: 6 N + 12 L nh hs T  (Kaplan et al. 2020; PaLM app. B).

        Each matmul weight does one multiply-add per token forward (2 FLOPs) and
        two backward (4 FLOPs): 6 per parameter. The output head is a matmul,
        tied or not; an embedding lookup is free. Attention scores q.k^T and the
        weighted sum att.v are 2 * 2 * T * hs FLOPs per head and layer forward,
        times 3 with the backward.
        """
        cfg, T = self.cfg, T or self.cfg.block_size
        matmul = self.num_params(embeddings=False)
        matmul += self.lm_head.weight.numel() if cfg.tie_embeddings else 0
        return 6 * matmul + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * T

    def mfu(self, tokens_per_second, peak_flops, T=None):
        """Model FLOPs utilisation: achieved training FLOP/s over the hardware's peak."""
        return self.flops_per_token(T) * tokens_per_second / peak_flops

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32):
        """Load a Hugging Face-format folder (config.json + safetensors) of a
        GPT-2, Llama or Qwen3 model."""
        path = Path(path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json: expected a Hugging Face model folder")
        hf = json.loads((path / "config.json").read_text())
        cfg = config_from_hf(hf)
        # Their tensors, by their names; hf_weight_map says where each goes in ours.
        tensors = read_safetensors_folder(path)
        if hf["model_type"] == "gpt2" and "wte.weight" in tensors:  # older GPT-2 files drop the prefix
            tensors = {"transformer." + k: t for k, t in tensors.items()}
        with torch.device("meta"):  # no memory for random weights we overwrite anyway
            model = cls(cfg)
        state = {}
        for theirs, ours, kind in hf_weight_map(cfg, hf["model_type"]):
            if theirs not in tensors:
                raise KeyError(f"tensor {theirs!r} is missing from the checkpoint in {path}")
            t = tensors[theirs].to(dtype)
            t = t.t() if kind == "conv1d" and t.dim() == 2 else t  # GPT-2 stores [in, out]
            sizes = [model.get_parameter(name).shape[0] for name in ours]
            for name, part in zip(ours, t.split(sizes, dim=0)):  # c_attn holds q, k, v stacked
                state[name] = part.contiguous()
        if cfg.tie_embeddings:
            state["lm_head.weight"] = state["tok_emb.weight"]
        # strict: every parameter must be filled (a missing one would stay uninitialised);
        # assign: take the loaded tensors as they are instead of copying into meta ones.
        model.load_state_dict(state, strict=True, assign=True)
        model._rebuild_buffers()
        return model.eval()

    def _rebuild_buffers(self):
        """Recompute the derived tables (RoPE, sinusoid), empty after a meta-device init, and
        re-tie the head: load_state_dict(assign=True) gave it a Parameter of its own."""
        cfg = self.cfg
        if cfg.pos_emb == "rope":
            self.rope_cos, self.rope_sin = rope_cos_sin(cfg.block_size, cfg.head_dim, cfg.rope_theta)
        elif cfg.pos_emb == "sinusoidal":
            self.pos_table = sinusoidal_positions(cfg.block_size, cfg.n_embd)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def save_pretrained(self, path, model_type=None):
        """Write config.json + model.safetensors that transformers can load."""
        cfg = self.cfg
        model_type = model_type or ("gpt2" if cfg.pos_emb == "learned" else "qwen3" if cfg.qk_norm else "llama")
        hf = config_to_hf(cfg, model_type)
        tensors = {}
        # The loading map run backwards: stack ours into theirs, transpose for GPT-2's Conv1D.
        for theirs, ours, kind in hf_weight_map(cfg, model_type):
            t = torch.cat([self.get_parameter(name).detach() for name in ours], dim=0)
            tensors[theirs] = t.t().contiguous() if kind == "conv1d" and t.dim() == 2 else t
        Path(path).mkdir(parents=True, exist_ok=True)
        write_safetensors(Path(path) / "model.safetensors", tensors)
        (Path(path) / "config.json").write_text(json.dumps(hf, indent=2))
    #< L05
    #> L09 from-checkpoint

    @classmethod
    def from_checkpoint(cls, path, device="cpu", ckpt=None):
        """(model, checkpoint dict) from a pretrain.py run folder or ckpt.pt file
        (or from `ckpt`, that file already loaded: a big one is read only once)."""
        path = Path(path)
        if ckpt is None:
            ckpt = load_checkpoint(path / "ckpt.pt" if path.is_dir() else path, map_location=device)
        if "model_config" not in ckpt or "model" not in ckpt:
            raise ValueError(f"{path} is not a checkpoint written by pretrain.py or sft.py")
        #> L12 not-a-generator
        if ckpt.get("scalar_head"):  # its head scores text instead of predicting tokens
            raise ValueError(f"{path} is a reward model (align.py config/reward.py), not a model that "
                             "writes text: PPO reads it through --reward_init; chat with or tune the "
                             "model it was trained from (out/sft)")
        #< L12
        model = cls(ModelConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
        return model.to(device).eval(), ckpt
    #< L09
#< L03


#> L04 one-row
# -----------------------------------------------------------------------------
# The KV cache and sampling


@contextlib.contextmanager
def one_row_matmuls(weight, rows):
    """Matmul kernels for a decode step of `rows` sequences (each weight matrix meets
    `rows` rows).

    subtle: for bf16 weights on a CPU, PyTorch's own kernel beats oneDNN's at one
    row (1.5x on this course's Zen 5 CPU), while at the prompt's many rows oneDNN
    is 7x faster. So a one-row decode step switches oneDNN off, and back: the flag
    is global. Batched decoding (several rows) was not measured, so it keeps oneDNN.
    """
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = before and not (rows == 1 and weight.device.type == "cpu" and
                                                    weight.dtype == torch.bfloat16)
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before
#< L04
#> L04 cache-and-sampling exercise


class KVCache:
    """Keys and values of every layer for the positions seen so far, preallocated.

    k, v: (n_layer, B, nkv, max_len, hs). Without a cache each new token would
    recompute keys and values of the whole prefix. Memory per token is
    2 * n_layer * nkv * hs numbers: for Qwen3-0.6B 2 * 28 * 8 * 128 = 57,344,
    112 KiB in bf16; GQA's 8 K/V heads instead of 16 halve it.
    """

    def __init__(self, cfg, batch_size, max_len, device=None, dtype=torch.float32):
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len, self.length, self.n_layer = max_len, 0, cfg.n_layer

    def update(self, layer, k, v):
        """Store `layer`'s new keys/values (B, nkv, T, hs); return all so far (B, nkv, length+T, hs)."""
        end = self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len={self.max_len}")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        if layer == self.n_layer - 1:  # every layer has stored this step: advance
            self.length = end
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick the next token from logits (B, V) -> (B,).

    temperature 0: greedy argmax. Otherwise divide the logits by the
    temperature (< 1 sharpens, > 1 flattens), keep the top_k most likely
    tokens and/or the smallest set whose probability reaches top_p ("nucleus",
    Holtzman et al. 2020), renormalise and draw with the given generator.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V) each
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p  # mass before this token already >= top_p
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))  # the top token always stays
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
#< L04


#> L05 weights
# -----------------------------------------------------------------------------
# Presets: from a laptop model to Qwen3-0.6B

PRESETS = {
    "tiny": dict(vocab_size=2048, block_size=256, n_layer=4, n_head=4, n_embd=128),
    "small": dict(vocab_size=4096, block_size=512, n_layer=6, n_head=6, n_embd=384),
    "gpt2": dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768,
                 pos_emb="learned", norm="layernorm", mlp="gelu", bias=True),
    "qwen3-0.6b": dict(vocab_size=151936, block_size=40960, n_layer=28, n_head=16, n_kv_head=8,
                       n_embd=1024, head_dim=128, n_inner=3072, rope_theta=1e6, norm_eps=1e-6,
                       qk_norm=True),
}


def preset(name, **overrides):
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


# -----------------------------------------------------------------------------
# safetensors, read and written by hand
#
# The format is three parts: 8 bytes (little-endian u64) giving the header's
# length N; N bytes of JSON {name: {"dtype", "shape", "data_offsets": [a, b]}};
# then the raw little-endian tensor bytes, offsets counted from the end of the
# header. No pickle, so loading a file cannot run code.

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


#> L05 safetensors exercise
def read_safetensors(path):
    """{name: tensor} from one .safetensors file, with errors that say what is wrong."""
    data = bytearray(os.path.getsize(path))  # writable, so torch.frombuffer can share it
    with open(path, "rb") as f:  # read into it: bytearray(f.read()) would briefly hold two copies
        f.readinto(data)
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if not 0 < n <= len(data) - 8:
        raise ValueError(f"{path}: corrupt safetensors header (length {n}, file {len(data)} bytes)")
    try:
        header = json.loads(data[8:8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
    tensors, base = {}, 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
        start, end = info.get("data_offsets", (0, -1))
        count = math.prod(info.get("shape", []))
        if dtype is None or end - start != count * dtype.itemsize or base + end > len(data):
            raise ValueError(f"{path}: tensor {name!r} has a bad dtype, shape or offsets ({info})")
        flat = torch.frombuffer(data, dtype=dtype, count=count, offset=base + start) if count else \
            torch.empty(0, dtype=dtype)
        tensors[name] = flat.reshape(info["shape"])
    return tensors
#< L05


def read_safetensors_folder(path):
    """model.safetensors, or every shard listed by model.safetensors.index.json."""
    if (path / "model.safetensors").exists():
        return read_safetensors(path / "model.safetensors")
    index = path / "model.safetensors.index.json"
    if not index.exists():
        raise FileNotFoundError(f"{path} has neither model.safetensors nor {index.name}")
    tensors = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        tensors.update(read_safetensors(path / shard))
    return tensors


def write_safetensors(path, tensors):
    """Write {name: tensor}; atomically (temp file + rename), header padded to 8 bytes."""
    names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        blob = t.reshape(-1).view(torch.uint8).numpy().tobytes()  # raw bytes, any dtype
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    header["__metadata__"] = {"format": "pt"}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format aligns the data to 8 bytes
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head + b"".join(blobs))
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# Hugging Face configs and parameter names (the only place their names appear)


def config_from_hf(hf):
    """ModelConfig from a transformers config.json of model_type gpt2, llama or qwen3."""
    kind = hf.get("model_type")
    if kind == "gpt2":
        if hf.get("activation_function", "gelu_new") != "gelu_new" or hf.get("scale_attn_by_inverse_layer_idx") \
                or hf.get("reorder_and_upcast_attn"):
            raise ValueError("this GPT-2 variant (activation or attention scaling) is not supported")
        return ModelConfig(vocab_size=hf["vocab_size"], block_size=hf["n_positions"],
                           n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                           n_inner=hf.get("n_inner"), pos_emb="learned", norm="layernorm",
                           norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp="gelu", bias=True,
                           tie_embeddings=True)
    if kind in ("llama", "qwen3"):
        rope = hf.get("rope_parameters") or {"rope_theta": hf.get("rope_theta", 10000.0),
                                             **(hf.get("rope_scaling") or {})}
        unsupported = [rope.get("rope_type", "default") != "default", hf.get("attention_bias"),
                       hf.get("mlp_bias"), hf.get("hidden_act", "silu") != "silu",
                       hf.get("use_sliding_window")]
        if any(unsupported):
            raise ValueError(f"{kind} config uses RoPE scaling, biases, sliding windows or a "
                             "non-SiLU activation, which this model does not implement")
        n_head = hf["num_attention_heads"]
        return ModelConfig(vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"],
                           n_layer=hf["num_hidden_layers"], n_head=n_head,
                           n_kv_head=hf.get("num_key_value_heads") or n_head, n_embd=hf["hidden_size"],
                           head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head,
                           n_inner=hf["intermediate_size"], pos_emb="rope", rope_theta=rope["rope_theta"],
                           norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu",
                           qk_norm=kind == "qwen3", bias=False,
                           tie_embeddings=hf.get("tie_word_embeddings", False))
    raise ValueError(f"model_type {kind!r} is not supported; use gpt2, llama or qwen3")


def config_to_hf(cfg, kind):
    """The inverse of config_from_hf; refuses a model the target type cannot express."""
    gpt2_like = (cfg.pos_emb, cfg.norm, cfg.mlp, cfg.bias, cfg.tie_embeddings, cfg.n_kv_head) == \
        ("learned", "layernorm", "gelu", True, True, cfg.n_head)
    llama_like = (cfg.pos_emb, cfg.norm, cfg.mlp, cfg.bias, cfg.qk_norm) == \
        ("rope", "rmsnorm", "swiglu", False, kind == "qwen3")
    if not (gpt2_like if kind == "gpt2" else llama_like):
        raise ValueError(f"this ModelConfig cannot be saved as model_type {kind!r}")
    if kind == "gpt2":
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size,
                "n_positions": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
                "n_head": cfg.n_head, "n_inner": cfg.n_inner, "activation_function": "gelu_new",
                "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": True}
    arch = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}[kind]
    return {"model_type": kind, "architectures": [arch], "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.n_embd, "intermediate_size": cfg.n_inner,
            "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim,
            "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
            "tie_word_embeddings": cfg.tie_embeddings}


def hf_weight_map(cfg, kind):
    """[(their name, [our names], how)]. how = "conv1d": GPT-2 stores Linear weights
    transposed, [in, out]; several of our names: their tensor stacks ours (c_attn = q, k, v)."""
    if kind == "gpt2":
        m = [("transformer.wte.weight", ["tok_emb.weight"], ""),
             ("transformer.wpe.weight", ["pos_emb.weight"], "")]
        for i in range(cfg.n_layer):
            h, b = f"transformer.h.{i}.", f"blocks.{i}."
            for p in ("weight", "bias"):
                m += [(h + f"ln_1.{p}", [b + f"norm1.{p}"], ""),
                      (h + f"attn.c_attn.{p}", [b + f"attn.{x}_proj.{p}" for x in "qkv"], "conv1d"),
                      (h + f"attn.c_proj.{p}", [b + f"attn.o_proj.{p}"], "conv1d"),
                      (h + f"ln_2.{p}", [b + f"norm2.{p}"], ""),
                      (h + f"mlp.c_fc.{p}", [b + f"mlp.up.{p}"], "conv1d"),
                      (h + f"mlp.c_proj.{p}", [b + f"mlp.down.{p}"], "conv1d")]
        return m + [(f"transformer.ln_f.{p}", [f"norm_f.{p}"], "") for p in ("weight", "bias")]
    m = [("model.embed_tokens.weight", ["tok_emb.weight"], "")]
    for i in range(cfg.n_layer):
        h, b = f"model.layers.{i}.", f"blocks.{i}."
        m += [(h + "input_layernorm.weight", [b + "norm1.weight"], ""),
              (h + "post_attention_layernorm.weight", [b + "norm2.weight"], "")]
        m += [(h + f"self_attn.{x}_proj.weight", [b + f"attn.{x}_proj.weight"], "") for x in "qkvo"]
        m += [(h + f"mlp.{x}_proj.weight", [b + f"mlp.{x}.weight"], "") for x in ("gate", "up", "down")]
        if cfg.qk_norm:
            m += [(h + f"self_attn.{x}_norm.weight", [b + f"attn.{x}_norm.weight"], "") for x in "qk"]
    m.append(("model.norm.weight", ["norm_f.weight"], ""))
    return m if cfg.tie_embeddings else m + [("lm_head.weight", ["lm_head.weight"], "")]
#< L05


#> L06 plumbing
# -----------------------------------------------------------------------------
# Plumbing every stage shares: config files, device and precision, checkpoints


def load_config(path, defaults, overrides=()):
    """Read a `name = value` config file, then `--name=value` overrides, strictly.

    The file is parsed as Python syntax but never executed: each line must
    assign a literal (number, string, bool, None, list), read by
    ast.literal_eval. Unknown names and wrong types are errors that list the
    valid names. The effective config is printed.
    """
    import ast

    cfg, valid = dict(defaults), ", ".join(sorted(defaults))

    def put(name, value, where):
        if name not in defaults:
            raise ValueError(f"{where}: unknown config key {name!r}; valid keys: {valid}")
        want = type(defaults[name])
        if defaults[name] is not None and not isinstance(value, want) and not (want is float and type(value) is int):
            raise ValueError(f"{where}: {name} must be {want.__name__}, got {value!r}")
        cfg[name] = float(value) if want is float else value

    if path:
        source = Path(path).read_text(encoding="utf-8")
        for node in ast.parse(source, str(path)).body:
            where = f"{path}:{node.lineno}"
            if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                    and isinstance(node.targets[0], ast.Name)):
                raise ValueError(f"{where}: expected `name = value`, got {ast.get_source_segment(source, node)!r}")
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                raise ValueError(f"{where}: the value of {node.targets[0].id} must be a literal "
                                 "(number, string, bool, None, list), not an expression") from None
            put(node.targets[0].id, value, where)
    for arg in overrides:
        name, sep, text = arg.removeprefix("--").partition("=")
        try:
            value = ast.literal_eval(text) if sep else True  # a bare --resume means True
        except (ValueError, SyntaxError):
            value = text  # a bare word: --dataset=shakespeare_char
        if isinstance(value, str) and value.startswith("~"):  # the shell expands ~ only at a word's start,
            value = str(Path(value).expanduser())  # not after --init=
        put(name, value, f"override {arg}")
    print("config: " + ", ".join(f"{k}={v!r}" for k, v in cfg.items()))
    return cfg
#< L06
#> L07 schedule exercise


def get_lr(it, cfg):
    """Linear warmup to lr, then cosine decay to min_lr at max_iters.

    Warmup: Adam's early second-moment estimates are noisy, so large first
    steps can diverge. Cosine: large steps while far from a minimum, small ones
    at the end to settle into it.
    """
    if it < cfg["warmup_iters"]:
        return cfg["lr"] * (it + 1) / cfg["warmup_iters"]
    progress = min(1.0, (it - cfg["warmup_iters"]) / max(1, cfg["max_iters"] - cfg["warmup_iters"]))
    return cfg["min_lr"] + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg["lr"] - cfg["min_lr"])


def clip_grad_norm(params, max_norm):
    """Scale all gradients by min(1, max_norm / ||g||), ||g|| over all of them together;
    returns ||g|| before clipping (logged: spikes warn of instability)."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    if max_norm > 0:
        torch._foreach_mul_(grads, torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    return norm
#< L07
#> L08 plumbing


def choose_device(requested="auto"):
    """cuda > mps > cpu, and say why: the first line of every run's log."""
    if requested != "auto":
        return torch.device(requested), f"{requested} (the config's device)"
    if torch.cuda.is_available():
        return torch.device("cuda"), f"cuda ({torch.cuda.get_device_name()})"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps"), "mps (Apple GPU)"
    return torch.device("cpu"), f"cpu ({os.cpu_count()} cores, no GPU found)"


def choose_dtype(device, requested="auto"):
    """Mixed-precision choice: bf16 where the hardware computes it natively, fp16 (+ loss
    scaling) on older GPUs, fp32 otherwise. Returns (dtype, reason)."""
    if requested != "auto":
        return getattr(torch, requested), f"{requested} (the config's dtype)"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "bf16 autocast (GPU supports bf16)"
        return torch.float16, "fp16 autocast + GradScaler (GPU lacks bf16)"
    if device.type == "cpu":
        flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
        if "avx512_bf16" in flags or "amx_bf16" in flags:
            return torch.bfloat16, "bf16 autocast (CPU has avx512_bf16/AMX)"
        return torch.float32, "fp32 (this CPU has no native bf16: emulated bf16 is slower)"
    return torch.float32, "fp32"


#> L08 atomic-save exercise
def save_checkpoint(path, state):
    """torch.save to a temporary file, then an atomic rename: a crash mid-write leaves
    the previous checkpoint intact, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
#< L08


def load_checkpoint(path, map_location="cpu"):
    """Load with weights_only=True: tensors and plain Python values only, so a
    checkpoint from elsewhere cannot execute code when loaded."""
    if not Path(path).exists():  # the option that named the path may be any of several
        raise FileNotFoundError(f"no checkpoint at {path}; train one first (python pretrain.py config/tiny.py "
                                "writes out/tiny, sft.py config/sft.py out/sft) or point the option that "
                                "named it (--init, --reward_init, --ckpt) at a run folder holding ckpt.pt")
    return torch.load(path, map_location=map_location, weights_only=True)


# -----------------------------------------------------------------------------
# The training loop's plumbing: pretrain.py, sft.py and align.py run the same


def setup_device(cfg):
    """(ddp, rank, world, device, why). Under torchrun (which sets RANK, WORLD_SIZE,
    LOCAL_RANK) there is one process per device; otherwise one process picks the best."""
    import torch.distributed as dist

    if "RANK" not in os.environ:
        return (False, 0, 1, *choose_device(cfg["device"]))
    backend = "nccl" if torch.cuda.is_available() else "gloo"  # nccl: GPUs; gloo: CPUs
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if backend == "nccl" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return True, rank, world, device, f"{device} (torchrun rank {rank} of {world}, {backend})"
#> L10 built-in-data


def refresh_data_on_rank0(cfg, ddp, master):
    """Under torchrun, rank 0 makes the built-in chat sets (or remakes stale ones:
    tokenizer.refresh_built_in) of every *.jsonl path in cfg while the other ranks wait.
    Every rank writing the same files at once could hand a reader half a file."""
    import torch.distributed as dist
    from tokenizer import refresh_built_in

    if ddp:
        if master:
            for path in [v for v in cfg.values() if isinstance(v, str) and v.endswith(".jsonl")]:
                refresh_built_in(Path(path).parent)
        dist.barrier()
#< L10


def setup_precision(device, requested="auto"):
    """(autocast, scaler, why) for choose_dtype's choice. autocast runs matmuls in
    bf16/fp16 and keeps precision-sensitive ops (softmax, norms, the loss) in fp32;
    the weights and the optimizer stay fp32 throughout. The GradScaler is a no-op
    unless fp16, whose small range needs the loss scaled up before backward."""
    from contextlib import nullcontext

    dtype, why = choose_dtype(device, requested)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    return autocast, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16), why


def optimizer_step(model, optimizer, scaler, loss, grad_clip, step, ckpt_path):
    """After backward: refuse a non-finite loss, clip, step, clear. Returns the gradient
    norm before clipping."""
    if not math.isfinite(loss.item()):  # stop before a NaN reaches a checkpoint
        raise FloatingPointError(f"loss is {loss.item()} at step {step}: training diverged. "
                                 f"The last good checkpoint stays at {ckpt_path}; try a lower lr")
    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    norm = clip_grad_norm(model.parameters(), grad_clip)
    scaler.step(optimizer)  # with fp16: skipped if the scaled gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)  # None, not zeros: frees memory, skips a fill
    return norm


def progress_line(step, max_iters, loss, lr, norm, dt, rate, eta, extra=""):
    """The log line: dt seconds per step, rate tokens/s, eta seconds left."""
    return (f"step {step}/{max_iters}  loss {loss:.4f}  lr {lr:.2e}  grad norm {norm:.2f}  "
            f"{dt * 1000:.0f} ms/step  {rate:,.0f} tok/s{extra}  ETA {eta / 60:.1f} min")


def training_state(model, optimizer, step, cfg, tok, **extra):
    """What a checkpoint holds: everything that shapes the next step (weights, Adam's
    moments, the step -- also the lr schedule's position and the next batch number --
    and the RNG, so dropout continues as if never stopped), the config, and the
    tokenizer itself, so the run folder stands alone wherever it is copied."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
            "rng": torch.get_rng_state(), "config": cfg, "model_config": model.cfg.__dict__,
            "tokenizer": tok.state(), **extra}


def resume_training(ckpt, model, optimizer):
    """Put a training_state back; returns the step to continue from."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])  # Adam's moments: without them, a jolt
    torch.set_rng_state(ckpt["rng"])
    return ckpt["step"]


def check_resume(ckpt, cfg, resumable, mcfg=None, tok=None):
    """Refuse to resume a checkpoint into a run that differs from it, naming each
    difference. Called twice: on the config before data preparation (cheap, fails
    fast), then on the model config and tokenizer, known once the data is ready."""
    old_cfg = ckpt.get("config", {})
    diffs = [f"{k} {old_cfg[k]!r} -> {v!r}" for k, v in cfg.items()
             if k in old_cfg and k not in resumable and k not in ModelConfig.__dataclass_fields__
             and old_cfg[k] != v]
    if mcfg is not None:  # the model's shape: what the preset and the data made of the config
        diffs += [f"{k} {old!r} -> {mcfg.__dict__[k]!r}" for k, old in ckpt["model_config"].items()
                  if mcfg.__dict__.get(k) != old and k != "attn_impl"]  # attn_impl: how, not what
    if tok is not None and isinstance(ckpt.get("tokenizer"), dict) and ckpt["tokenizer"] != tok.state():
        diffs.append("tokenizer (the dataset was prepared with another one)")
    if diffs:
        raise ValueError(f"cannot resume {cfg['out_dir']}: {', '.join(diffs)} differ from the "
                         "checkpoint; resume with its config, or start anew with another --out_dir")


def run_main(script, defaults, train, argv):
    """A training stage's command line: `python SCRIPT config/FILE.py [--key=value ...]`.

    Every key of `defaults` can come from the file or the command line;
    load_config prints the result, so each log starts with exactly what ran.
    Bad input ends in one line naming the problem; under torchrun every process
    leaves in order.
    """
    import sys
    import traceback

    import torch.distributed as dist

    if not argv or argv[0].startswith("--"):
        sys.exit(f"usage: python {script} config/FILE.py [--key=value ...]")
    try:
        result = train(load_config(argv[0], defaults, argv[1:]))
    except (ValueError, FileNotFoundError, FloatingPointError) as e:  # bad input: the message is the help
        print(f"{script}: {e}", file=sys.stderr)
        shutdown(1) if dist.is_initialized() else sys.exit(1)
    except BaseException:
        if dist.is_initialized():
            traceback.print_exc()
            shutdown(1)
        raise
    val = result.get("val_loss")  # align.py's methods report their own held-out numbers instead
    print(f"done: step {result['step']}" + (f", val loss {val:.4f}" if val is not None else ""))
    if dist.is_initialized():
        shutdown(0)
    return result


def shutdown(code):
    """Leave a torchrun process. subtle: with torch 2.13 on CPU, gloo sometimes aborts
    (SIGABRT in a destructor at interpreter exit) after a run that finished correctly.
    An orderly teardown, flushed output, then os._exit skips those destructors."""
    import sys

    import torch.distributed as dist

    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
#< L08
#> L09 load-run


def load_run(path, device="cpu", dtype=None):
    """(model, tokenizer, checkpoint) from a run folder or a ckpt.pt, wherever it was
    copied: the checkpoint carries its tokenizer's state. Checkpoints written before
    that stored the tokenizer file's path instead, which still works while the file is
    there. dtype: cast the weights (torch.bfloat16 halves memory for inference)."""
    from tokenizer import load_tokenizer  # only this helper needs it: model.py stays standalone

    #> L10 hf-run
    if is_hf_folder(path):  # a downloaded Hugging Face model: its folder is the checkpoint
        return load_hf_run(path, device, dtype)
    #< L10
    ckpt = load_checkpoint(Path(path) / "ckpt.pt" if Path(path).is_dir() else path, device)
    #> L14 lora-run
    if "lora" in ckpt:  # a LoRA run holds its adapter alone: rebuild its base, then attach
        import peft  # imported here: peft.py imports model.py
        if not Path(ckpt["lora"]["base"]).exists():
            raise FileNotFoundError(f"{path} is a LoRA run: it holds only the adapter, and its base "
                                    f"checkpoint {ckpt['lora']['base']} is missing; copy the base there")
        model, tok, _ = load_run(ckpt["lora"]["base"], device, dtype)
        return peft.attach_adapter(model, ckpt), tok, ckpt
    #< L14
    model, ckpt = CausalLM.from_checkpoint(path, device, ckpt)
    source = ckpt.get("tokenizer")
    if source is None or (isinstance(source, str) and not Path(source).exists()):
        raise FileNotFoundError(f"{path} has no tokenizer (an old checkpoint whose tokenizer file "
                                f"{source} is gone): prepare the same dataset again, or retrain")
    return model.to(dtype) if dtype else model, load_tokenizer(source), ckpt
#< L09
#> L10 hf-run


def is_hf_folder(path):
    """A Hugging Face model folder (config.json + weights), not one of our run folders."""
    path = Path(path)
    return path.is_dir() and (path / "config.json").exists() and not (path / "ckpt.pt").exists()


def load_hf_run(path, device="cpu", dtype=None):
    """(model, tokenizer, checkpoint-like dict) from a Hugging Face folder: config.json,
    *.safetensors, tokenizer.json and, for a chat model, its chat template.

    The dict holds what our checkpoints hold for the stages that read them: the
    model's config, the tokenizer's state (its chat format included, so a model
    fine-tuned from here chats in Qwen3's or Llama 3's layout after reloading),
    and "chat" when the folder ships a template (chat.py then opens a chat).
    """
    from tokenizer import BPETokenizer, hf_chat_template

    path = Path(path)
    if not (path / "tokenizer.json").exists():
        raise FileNotFoundError(f"{path} has no tokenizer.json: download the model's whole folder "
                                "(weights, config.json, tokenizer.json, tokenizer_config.json)")
    model = CausalLM.from_pretrained(path, dtype=dtype or torch.float32).to(device)
    tok = BPETokenizer.from_hf(path)
    if tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"{path}: tokenizer.json has {tok.vocab_size} tokens, the model only "
                         f"{model.cfg.vocab_size} embedding rows; the files are from different models")
    chat = tok.chat_format is not None and bool(hf_chat_template(path))
    return model, tok, {"model_config": dict(model.cfg.__dict__), "tokenizer": tok.state(), "chat": chat}


# -----------------------------------------------------------------------------
# Packing: several conversations in one row, each attending only to itself


def packed_positions(segments):
    """(B, T) segment ids -> positions (B, T) and an attention mask (B, 1, T, T).

    A packed row holds several conversations back to back. Each must see the
    model exactly as if it sat alone in its row: positions restart at 0 where
    its segment starts, and a token attends to earlier tokens of its own
    segment only -- the causal triangle cut into blocks along the diagonal.
    Segments must be contiguous; any value works as long as neighbours differ.
    >>> pos, mask = packed_positions(torch.tensor([[0, 0, 1, 1, 1]]))
    >>> pos.tolist(), mask[0, 0].int().tolist()
    ([[0, 1, 0, 1, 2]], [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]])
    """
    B, T = segments.shape
    t = torch.arange(T, device=segments.device).expand(B, T)  # (B, T)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]  # True where a segment begins
    first = torch.where(starts, t, 0).cummax(dim=1).values  # where the current segment began
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T): same conversation
    return t - first, (same & causal_mask(T, T, segments.device))[:, None]  # (B, 1, T, T)


# -----------------------------------------------------------------------------
# Chat plumbing: one reply through the template, and exact match with its error bar


def chat_stream(model, tok, messages, max_new_tokens=32, temperature=0.0, top_k=None, top_p=None,
                generator=None):
    """The assistant's reply to `messages` (ending with a user turn), as text pieces
    while the tokens arrive (chat.py prints them as they come).

    Renders the conversation for completion (it ends with <|assistant_start|>)
    and stops at <|assistant_end|>: the end token the model was trained to
    produce is what makes a chat model stop talking. (A real model's template,
    tokenizer.CHAT_FORMATS, has its own: <|im_end|> for Qwen3, <|eot_id|> for Llama 3.)
    """
    from tokenizer import chat_end, decode_stream  # only the chat helpers need them

    ids, _ = tok.render_conversation(messages, for_completion=True)
    end = tok.special_tokens[chat_end(tok)]
    prompt = torch.tensor([ids], device=next(model.parameters()).device)
    tokens = model.stream(prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          eos_id=end, generator=generator)
    # A base model never learned the end of a turn; its end of a document ends the reply too.
    ends = {end} | {tok.special_tokens.get(t) for t in ("<|endoftext|>", "<|end_of_text|>")}
    return decode_stream(tok, tokens, stop_ids=ends - {None})


def chat_reply(model, tok, messages, max_new_tokens=32, temperature=0.0, generator=None):
    """The whole reply as one string (greedy by default): what evaluations compare."""
    return "".join(chat_stream(model, tok, messages, max_new_tokens, temperature, generator=generator))


def wilson_interval(right, n, z=1.96):
    """95% confidence interval of an accuracy right/n (Wilson 1927).

    The textbook p +- z sqrt(p(1-p)/n) collapses to zero width at p = 0 or 1
    and leaves [0, 1]; Wilson's interval inverts the normal test instead:
        center = (p + z^2/2n) / (1 + z^2/n)
        half   = z / (1 + z^2/n) * sqrt(p(1-p)/n + z^2/4n^2)
    >>> [round(x, 3) for x in wilson_interval(8, 10)]
    [0.49, 0.943]
    """
    if n == 0:
        return 0.0, 1.0
    p, zz = right / n, z * z / n
    center = (p + zz / 2) / (1 + zz)
    half = z / (1 + zz) * math.sqrt(p * (1 - p) / n + zz / (4 * n))
    return max(0.0, center - half), min(1.0, center + half)


def exact_match(model, tok, examples, max_new_tokens=16, progress=None):
    """Greedy replies to each example's prompt, compared with its reference answer.

    examples: message lists whose last message is the reference (assistant)
    answer; the prompt is everything before it. Compared after stripping spaces
    and case. Returns {accuracy, ci_low, ci_high (Wilson 95%), n, right, wrong,
    replies}: right/wrong are the examples themselves, replies the model's
    answers in the order of `examples`.
    """
    right, wrong, replies = [], [], []
    for i, chat in enumerate(examples):
        reply = chat_reply(model, tok, chat[:-1], max_new_tokens)
        replies.append(reply)
        ok = reply.strip().lower() == chat[-1]["content"].strip().lower()
        (right if ok else wrong).append(chat)
        if progress:
            progress(i + 1, len(examples))
    n = len(examples)
    low, high = wilson_interval(len(right), n)
    return {"accuracy": len(right) / max(n, 1), "ci_low": low, "ci_high": high, "n": n,
            "right": right, "wrong": wrong, "replies": replies}
#< L10
