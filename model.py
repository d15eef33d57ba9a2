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
and the whole model (03), the KV cache and generation (04), presets, counting
and real weights (05; hf.py reads their files), packed rows (10). Nothing here
trains: run.py holds what a training run needs. A tiny model runs on a CPU in
milliseconds:
    cfg = ModelConfig(vocab_size=512, n_layer=2, n_head=4, n_embd=64)
    logits, loss = CausalLM(cfg)(idx, targets)   # idx, targets: (B, T) ids
"""

import contextlib
import math
from dataclasses import dataclass

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
    # subtle (lesson 08's bf16 training): on a CPU, PyTorch's bf16 flash-attention backward is ~4x slower than its fp32
    # one at training shapes (B 12, 4 heads, T 64, hs 32: 4.4 ms against 1.0 on one Zen 5
    # core). So while gradients are recorded it runs on fp32 copies; the matmuls stay bf16.
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.requires_grad:
        with torch.autocast("cpu", enabled=False):  # or autocast casts them back to bf16
            return sdpa_attention(q.float(), k.float(), v.float(), dropout_p).to(q.dtype)
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
        if mask is not None:  # lesson 10's packed rows: SDPA with the block-diagonal mask, whatever attn_impl
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True,
                                               dropout_p=self.cfg.dropout if self.training else 0.0)
            return self.dropout(self.o_proj(merge_heads(y)))
        if self.cfg.attn_impl == "naive":
            n_rep = self.cfg.n_head // self.cfg.n_kv_head
            y = naive_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep),
                                causal_mask(q.size(2), k.size(2), x.device))
        #> L15 attn-impl
        elif self.cfg.attn_impl in ("flash", "triton"):
            import kernels  # here, not at the top: only this path needs it (lesson 15)
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
        # Lesson 14's QLoRA (peft.py) holds a frozen weight as packed 4-bit codes, a buffer: count its weights
        n += sum(math.prod(m.weight_shape) for m in self.modules() if hasattr(m, "weight_shape"))
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
        GPT-2, Llama or Qwen3 model; hf.py reads the files and maps the names."""
        import hf  # here, not at the top: hf.py imports model.py

        return hf.load_pretrained(path, dtype)

    def save_pretrained(self, path, model_type=None):
        """Write config.json + model.safetensors that transformers can load (hf.py)."""
        import hf

        hf.save_pretrained(self, path, model_type)
    #< L05
#< L03


#> L04 cache-and-sampling exercise
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
    # 8 heads of 16, not 4 of 32: the same parameters, and with them lesson 10's SFT forms the
    # story's where and what-kind lookups on every data order tried. Each head's softmax picks
    # its own earlier position: more heads, more facts fetched at once (lessons.md, lesson 10).
    "tiny": dict(vocab_size=2048, block_size=256, n_layer=4, n_head=8, n_embd=128),
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
#< L05
#> L10 packing


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
#< L10
