#> L15 kernels
"""
kernels.py -- flash attention from first principles, in PyTorch and in Triton.

model.py's attention, softmax(Q K^T / sqrt(hs)) V, writes the whole (Tq, Tk)
score matrix S and the probabilities P to memory: 2 GiB each in fp32 for 8
heads at T = 8192, read and written several times for a few FLOPs per byte.
Flash attention (Dao et al. 2022) computes exactly the same numbers in tiles
small enough for fast memory, and never holds more than one tile of S or P.
What makes this possible is the online softmax (Milakov & Gimelshein 2018):
a row's softmax can be built block by block, carrying a running max and a
running sum, so the output never needs the whole row at once.

Read it in order:
  online_softmax     the trick alone, on plain rows
  flash_forward      tiled attention in O(T) memory; keeps the logsumexp L
  flash_backward     the gradients, recomputing P tile by tile from Q, K, L
  FlashAttention     the two joined as a torch.autograd.Function
  triton_kernels     the forward and the backward as Triton kernels (optional)

    from kernels import flash_attention
    y = flash_attention(q, k, v, causal=True)  # q (B, nh, Tq, hs), k, v (B, nkv, Tk, hs)

model.py switches to these with ModelConfig(attn_impl="flash" | "triton");
`python bench.py attention` measures time and memory against model.py's
naive path and PyTorch's SDPA. On a CPU the Triton kernels run only in
Triton's interpreter (TRITON_INTERPRET=1, slow: the tests use it).

Papers: Dao et al. 2022, "FlashAttention" (tiling, recomputation); Dao 2023,
"FlashAttention-2" (loop order, fewer non-matmul FLOPs); Shah et al. 2024,
"FlashAttention-3" (Hopper: asynchrony, FP8).
"""

import math
import os

import torch

# Tile sizes (B_r query rows, B_c key columns). On a CPU, bigger tiles mean
# fewer Python-level steps; memory is O(B_r B_c) per tile, still O(T) overall.
BLOCK_Q, BLOCK_K = 128, 128

# -----------------------------------------------------------------------------
# The online softmax: one pass over a row, block by block


#> L15 online-softmax exercise
def online_softmax(x, block=4):
    """softmax(x) over the last dim, reading each row once, `block` entries at a time.

    Carry m, the max of the entries seen so far, and l = sum_j e^(x_j - m).
    A new block b moves the max to m' = max(m, max_b x), and each old term
    e^(x_j - m) = e^(x_j - m') e^(m' - m), so

        l' = l e^(m - m') + sum_{j in b} e^(x_j - m')

    After the last block m = max x and l = sum_j e^(x_j - max x), the safe
    softmax's denominator. Dividing e^(x - m) by l is a second, elementwise
    pass here; in attention it disappears, because the output itself is
    carried and rescaled by the same e^(m - m') (flash_forward).

    >>> online_softmax(torch.tensor([[1.0, 2.0, 3.0]]), block=2)
    tensor([[0.0900, 0.2447, 0.6652]])
    """
    m = torch.full(x.shape[:-1], float("-inf"), dtype=x.dtype, device=x.device)  # running max
    l = torch.zeros_like(m)  # running sum of e^(x - m)
    for j in range(0, x.size(-1), block):
        xb = x[..., j:j + block]  # (..., block)
        m_new = torch.maximum(m, xb.amax(-1))
        # subtle: while a row has seen only -inf, m_new = -inf and e^(-inf - (-inf)) is nan.
        # Shifting by 0 there instead gives e^(-inf) = 0 for every term, which is right.
        shift = torch.where(m_new == float("-inf"), 0.0, m_new)
        l = l * torch.exp(m - shift) + torch.exp(xb - shift[..., None]).sum(-1)
        m = m_new
    # A row of only -inf ends as 0/0 = nan, exactly like torch.softmax.
    return torch.exp(x - m[..., None]) / l[..., None]
#< L15


# -----------------------------------------------------------------------------
# Which key tiles a query tile sees (causal, bottom-right aligned)


def key_tiles(i0, i1, Tq, Tk, block_k, causal, device=None):
    """Yield (j0, j1, mask) for the key tiles that query rows i0:i1 attend to.

    As model.causal_mask defines it, the Tq queries are the last Tq of the Tk
    positions: query i sits at position Tk - Tq + i and sees keys j <= Tk - Tq + i.
    Tiles wholly above that diagonal are never visited (at Tq = Tk about half
    of all tiles); tiles wholly below it need no mask (mask is None); only the
    tiles the diagonal crosses get a (i1 - i0, j1 - j0) bool mask.

    >>> [(j0, j1, m is None) for j0, j1, m in key_tiles(0, 4, 8, 8, 4, True)]
    [(0, 4, False)]
    >>> [(j0, j1, m is None) for j0, j1, m in key_tiles(4, 8, 8, 8, 4, True)]
    [(0, 4, True), (4, 8, False)]
    """
    offset = Tk - Tq  # position of query 0
    end = min(Tk, offset + i1) if causal else Tk  # one past the last key the tile's last row sees
    for j0 in range(0, end, block_k):
        j1 = min(j0 + block_k, Tk)
        mask = None
        if causal and j1 - 1 > offset + i0:  # the tile's first row cannot see its last key
            rows = torch.arange(offset + i0, offset + i1, device=device)  # query positions
            cols = torch.arange(j0, j1, device=device)  # key positions
            mask = cols[None, :] <= rows[:, None]  # (i1 - i0, j1 - j0)
        yield j0, j1, mask


# -----------------------------------------------------------------------------
# Flash attention forward: tiles of Q against tiles of K and V


def check_shapes(q, k, v, causal):
    """One clear line for the shape mistakes attention code tends to make."""
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"expected q (B, nh, Tq, hs) and k, v (B, nkv, Tk, hs); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.size(0) != k.size(0) or q.size(3) != k.size(3) or q.size(1) % k.size(1):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)}: batch and head size must match "
                         "and n_head must be a multiple of n_kv_head")
    if causal and q.size(2) > k.size(2):
        raise ValueError(f"causal attention needs Tq <= Tk (queries are the last Tq positions); "
                         f"got Tq={q.size(2)}, Tk={k.size(2)}")


#> L15 flash-forward exercise
def flash_forward(q, k, v, causal=True, block_q=BLOCK_Q, block_k=BLOCK_K):
    """Attention O (B, nh, Tq, hs) and the logsumexp L (B, nh, Tq) of each score row.

    For each tile of B_r query rows Q_i, loop over the key tiles K_j, V_j
    (Dao 2023's order: queries outside, so each tile's output stays local):
        S   = Q_i K_j^T / sqrt(hs)                   (B_r, B_c), the only scores alive
        m'  = max(m, rowmax S)                       running max
        P   = e^(S - m')                             unnormalised probabilities
        l   = l e^(m - m') + rowsum P                running sum, as in online_softmax
        acc = acc e^(m - m') + P V_j                 output, rescaled the same way
    then O_i = acc / l and L_i = m + log l = log sum_j e^(S_ij), all the
    backward needs to rebuild any P tile. Memory: Q, K, V, O and one tile.

    GQA: query head h reads K/V head h // (nh / nkv); viewing Q as
    (B, nkv, group, Tq, hs) lets one K/V tile broadcast over its group, with
    no copy (model.repeat_kv copies).

    >>> q = k = v = torch.randn(1, 2, 5, 8)
    >>> o, L = flash_forward(q, k, v, block_q=2, block_k=2)
    >>> o.shape, L.shape
    (torch.Size([1, 2, 5, 8]), torch.Size([1, 2, 5]))
    """
    B, nh, Tq, hs = q.shape
    nkv, Tk = k.size(1), k.size(2)
    scale = 1.0 / math.sqrt(hs)
    acc_dtype = torch.promote_types(q.dtype, torch.float32)  # fp32 sums (fp64 for gradcheck)
    qg = q.view(B, nkv, nh // nkv, Tq, hs)  # (B, nkv, group, Tq, hs)
    o = torch.empty(qg.shape, dtype=acc_dtype, device=q.device)
    L = torch.empty(qg.shape[:-1], dtype=acc_dtype, device=q.device)  # (B, nkv, group, Tq)
    for i0 in range(0, Tq, block_q):
        i1 = min(i0 + block_q, Tq)
        qi = qg[..., i0:i1, :].to(acc_dtype)  # (B, nkv, group, B_r, hs)
        m = torch.full(qi.shape[:-1], float("-inf"), dtype=acc_dtype, device=q.device)
        l = torch.zeros_like(m)
        acc = torch.zeros_like(qi)
        # subtle: no -inf trap here: key 0 is visible to every row, so after the
        # first tile m is finite, and e^(m - m') is 0 (first tile) or in (0, 1].
        for j0, j1, mask in key_tiles(i0, i1, Tq, Tk, block_k, causal, q.device):
            kj = k[:, :, None, j0:j1].to(acc_dtype)  # (B, nkv, 1, B_c, hs): broadcasts over the group
            vj = v[:, :, None, j0:j1].to(acc_dtype)  # (B, nkv, 1, B_c, hs)
            s = (qi @ kj.transpose(-2, -1)) * scale  # (B, nkv, group, B_r, B_c)
            if mask is not None:
                s = s.masked_fill(~mask, float("-inf"))
            m_new = torch.maximum(m, s.amax(-1))
            p = torch.exp(s - m_new[..., None])
            alpha = torch.exp(m - m_new)  # how much the old max overestimated: rescale the past
            l = l * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + p @ vj
            m = m_new
        o[..., i0:i1, :] = acc / l[..., None]
        L[..., i0:i1] = m + torch.log(l)
    return o.view(B, nh, Tq, hs).to(q.dtype), L.view(B, nh, Tq)
#< L15


# -----------------------------------------------------------------------------
# Flash attention backward: recompute P from L instead of storing it


def flash_backward(do, q, k, v, o, L, causal=True, block_q=BLOCK_Q, block_k=BLOCK_K):
    """dQ, dK, dV from dO, recomputing each P tile from Q, K and L (Dao et al. 2022, App. B).

    With S = Q K^T / sqrt(hs), P = softmax(S) = e^(S - L), O = P V:
        dV = P^T dO                                      (1)
        dP = dO V^T                                      (2)
        dS = P ∘ (dP - D),  D = rowsum(dO ∘ O)           (3)
        dQ = dS K / sqrt(hs),  dK = dS^T Q / sqrt(hs)    (4)
    (3) is the softmax Jacobian, dS_ij = P_ij (dP_ij - sum_k P_ik dP_ik), and
    sum_k P_ik dP_ik = sum_k P_ik (dO_i . V_k) = dO_i . O_i: one number per row,
    from O, without P. Storing P would cost O(T^2) memory; recomputing it
    costs one more Q K^T per tile, cheap next to the memory traffic saved.
    GQA: a K/V head's gradient sums over the query heads of its group.
    """
    B, nh, Tq, hs = q.shape
    nkv, Tk = k.size(1), k.size(2)
    scale = 1.0 / math.sqrt(hs)
    acc_dtype = torch.promote_types(q.dtype, torch.float32)
    group = (B, nkv, nh // nkv, Tq)
    qg = q.view(*group, hs).to(acc_dtype)  # (B, nkv, group, Tq, hs)
    dog = do.reshape(*group, hs).to(acc_dtype)  # (B, nkv, group, Tq, hs)
    D = (dog * o.view(*group, hs)).sum(-1)  # (B, nkv, group, Tq)                   (3)
    Lg = L.view(*group)  # (B, nkv, group, Tq)
    dq = torch.zeros_like(qg)
    dk = torch.zeros(k.shape, dtype=acc_dtype, device=k.device)  # (B, nkv, Tk, hs)
    dv = torch.zeros_like(dk)
    for i0 in range(0, Tq, block_q):
        i1 = min(i0 + block_q, Tq)
        qi, doi = qg[..., i0:i1, :], dog[..., i0:i1, :]  # (B, nkv, group, B_r, hs)
        Li, Di = Lg[..., i0:i1, None], D[..., i0:i1, None]  # (B, nkv, group, B_r, 1)
        for j0, j1, mask in key_tiles(i0, i1, Tq, Tk, block_k, causal, q.device):
            kj = k[:, :, None, j0:j1].to(acc_dtype)  # (B, nkv, 1, B_c, hs)
            vj = v[:, :, None, j0:j1].to(acc_dtype)  # (B, nkv, 1, B_c, hs)
            s = (qi @ kj.transpose(-2, -1)) * scale  # S, recomputed
            if mask is not None:
                s = s.masked_fill(~mask, float("-inf"))
            p = torch.exp(s - Li)  # P = e^(S - L): normalised already, no max or sum needed
            dv[:, :, j0:j1] += (p.transpose(-2, -1) @ doi).sum(2)  # (1), summed over the group
            dp = doi @ vj.transpose(-2, -1)  # (2)
            ds = p * (dp - Di)  # (3)
            dq[..., i0:i1, :] += (ds @ kj) * scale  # (4)
            dk[:, :, j0:j1] += (ds.transpose(-2, -1) @ qi).sum(2) * scale  # (4), summed over the group
    return dq.view(B, nh, Tq, hs).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class FlashAttention(torch.autograd.Function):
    """Autograd glue: save Q, K, V, O and L (O(T) memory, no T x T tensor) and
    recompute on the way back. `fns` is (flash_forward, flash_backward) or the
    Triton pair (triton_forward, triton_backward): same arguments, same results."""

    @staticmethod
    def forward(ctx, q, k, v, causal, blocks, fns):
        o, L = fns[0](q, k, v, causal, *blocks)
        ctx.save_for_backward(q, k, v, o, L)
        ctx.causal, ctx.blocks, ctx.backward_fn = causal, blocks, fns[1]
        return o

    @staticmethod
    def backward(ctx, do):
        dq, dk, dv = ctx.backward_fn(do, *ctx.saved_tensors, ctx.causal, *ctx.blocks)
        return dq, dk, dv, None, None, None  # causal, blocks, fns get no gradient


def flash_attention(q, k, v, causal=True, block_q=BLOCK_Q, block_k=BLOCK_K):
    """Exact attention in O(T) memory, differentiable; equal to model.sdpa_attention.

    q: (B, nh, Tq, hs); k, v: (B, nkv, Tk, hs) with nkv dividing nh; with
    causal, Tq <= Tk and the queries are the last Tq positions.
    """
    check_shapes(q, k, v, causal)
    return FlashAttention.apply(q, k, v, causal, (block_q, block_k), (flash_forward, flash_backward))


# -----------------------------------------------------------------------------
# Triton kernels: the same loops, one program per tile

_KERNELS = None  # built on first use: importing triton is slow, and it is optional


def triton_kernels():
    """Import triton and define the three kernels (once): forward, dK/dV, dQ.

    On a CPU they run only in Triton's interpreter: TRITON_INTERPRET=1 set
    before triton is first imported. subtle: triton.language's own helpers
    (tl.max, tl.sum) are jit functions built at that import, in the mode then in
    force; tests/test_l15_kernels.py's fixture shows how to rebuild them.
    On a GPU, tl.dot on fp32 inputs uses TF32 (10-bit mantissa) by default:
    expect agreement with the PyTorch version to ~1e-3 there, not 1e-5.
    Pointer arithmetic: X + b * sx[0] + h * sx[1] + t * sx[2] + c * sx[3] is
    element (b, h, t, c) of a (B, heads, T, hs) tensor with strides sx.
    """
    global _KERNELS
    if _KERNELS is not None:
        return _KERNELS
    try:
        import triton
        import triton.language as tl
    except ImportError as e:
        raise ImportError("the Triton kernels need triton: pip install -r requirements-triton.txt") from e

    @triton.jit
    def flash_fwd(Q, K, V, O, L, sq, sk, sv, so, Tq, Tk, nh, group, scale,
                  HS: tl.constexpr, CAUSAL: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        # Program (query tile, batch * head): O and L for BLOCK_M rows, as flash_forward.
        b, h = tl.program_id(1) // nh, tl.program_id(1) % nh
        kvh = h // group  # GQA: the K/V head this query head reads, nothing copied
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # query indices
        d = tl.arange(0, BLOCK_D)  # BLOCK_D: hs rounded up to a power of two, the rest masked
        q_mask = (rows[:, None] < Tq) & (d[None, :] < HS)
        q = tl.load(Q + b * sq[0] + h * sq[1] + rows[:, None] * sq[2] + d[None, :] * sq[3],
                    mask=q_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l = tl.full([BLOCK_M], 0.0, tl.float32)
        acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
        offset = Tk - Tq  # position of query 0
        end = Tk
        if CAUSAL:  # skip the key tiles above the diagonal, as key_tiles does
            end = tl.minimum(Tk, offset + (tl.program_id(0) + 1) * BLOCK_M)
        for j0 in range(0, end, BLOCK_N):
            j = j0 + tl.arange(0, BLOCK_N)  # key positions of this tile
            kv_mask = (j[:, None] < Tk) & (d[None, :] < HS)
            k = tl.load(K + b * sk[0] + kvh * sk[1] + j[:, None] * sk[2] + d[None, :] * sk[3],
                        mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
            v = tl.load(V + b * sv[0] + kvh * sv[1] + j[:, None] * sv[2] + d[None, :] * sv[3],
                        mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale  # (BLOCK_M, BLOCK_N), fp32 accumulation
            visible = j[None, :] < Tk  # the last tile may run past Tk
            if CAUSAL:
                visible = visible & (j[None, :] <= offset + rows[:, None])
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            l = l * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)  # P in V's dtype: the tensor-core path
            m = m_new
        out = O + b * so[0] + h * so[1] + rows[:, None] * so[2] + d[None, :] * so[3]
        tl.store(out, (acc / l[:, None]).to(O.dtype.element_ty), mask=q_mask)
        tl.store(L + (b * nh + h) * Tq + rows, m + tl.log(l), mask=rows < Tq)

    @triton.jit
    def flash_bwd_dkdv(Q, K, V, dO, L, D, dK, dV, sq, sk, sv, sdo, Tq, Tk, nh, group, scale,
                       HS: tl.constexpr, CAUSAL: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        # Program (key tile, batch * K/V head): dK and dV of BLOCK_N keys, summed over every
        # query tile that sees them and every query head of the group. FA2's backward order:
        # keys outside, so each program owns its dK, dV (no atomic adds) -- dQ is done apart.
        b, kvh = tl.program_id(1) // (nh // group), tl.program_id(1) % (nh // group)
        j = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # key positions
        d = tl.arange(0, BLOCK_D)
        kv_mask = (j[:, None] < Tk) & (d[None, :] < HS)
        k = tl.load(K + b * sk[0] + kvh * sk[1] + j[:, None] * sk[2] + d[None, :] * sk[3],
                    mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(V + b * sv[0] + kvh * sv[1] + j[:, None] * sv[2] + d[None, :] * sv[3],
                    mask=kv_mask, other=0.0)
        dk = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)
        dv = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)
        offset = Tk - Tq
        start = 0
        if CAUSAL:  # query i sees key j only if j <= offset + i: skip the tiles before that
            start = tl.maximum(0, tl.program_id(0) * BLOCK_N - offset) // BLOCK_M * BLOCK_M
        for h in range(kvh * group, kvh * group + group):
            for i0 in range(start, Tq, BLOCK_M):
                rows = i0 + tl.arange(0, BLOCK_M)  # query indices
                q_mask = (rows[:, None] < Tq) & (d[None, :] < HS)
                q = tl.load(Q + b * sq[0] + h * sq[1] + rows[:, None] * sq[2] + d[None, :] * sq[3],
                            mask=q_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
                do = tl.load(dO + b * sdo[0] + h * sdo[1] + rows[:, None] * sdo[2] + d[None, :] * sdo[3],
                             mask=q_mask, other=0.0)
                Li = tl.load(L + (b * nh + h) * Tq + rows, mask=rows < Tq, other=0.0)
                Di = tl.load(D + (b * nh + h) * Tq + rows, mask=rows < Tq, other=0.0)
                visible = (rows[:, None] < Tq) & (j[None, :] < Tk)
                if CAUSAL:
                    visible = visible & (j[None, :] <= offset + rows[:, None])
                s = tl.dot(q, tl.trans(k)) * scale  # S, recomputed
                p = tl.where(visible, tl.exp(s - Li[:, None]), 0.0)  # P = e^(S - L)
                dv += tl.dot(tl.trans(p).to(do.dtype), do)  # (1) dV += P^T dO
                dp = tl.dot(do, tl.trans(v))  # (2) dP = dO V^T
                ds = p * (dp - Di[:, None])  # (3) dS = P o (dP - D)
                dk += tl.dot(tl.trans(ds).to(q.dtype), q) * scale  # (4) dK += dS^T Q / sqrt(hs)
        tl.store(dK + b * sk[0] + kvh * sk[1] + j[:, None] * sk[2] + d[None, :] * sk[3],
                 dk.to(dK.dtype.element_ty), mask=kv_mask)
        tl.store(dV + b * sv[0] + kvh * sv[1] + j[:, None] * sv[2] + d[None, :] * sv[3],
                 dv.to(dV.dtype.element_ty), mask=kv_mask)

    @triton.jit
    def flash_bwd_dq(Q, K, V, dO, L, D, dQ, sq, sk, sv, sdo, Tq, Tk, nh, group, scale,
                     HS: tl.constexpr, CAUSAL: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        # Program (query tile, batch * head): dQ of BLOCK_M rows, looping over keys as the forward.
        b, h = tl.program_id(1) // nh, tl.program_id(1) % nh
        kvh = h // group
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, BLOCK_D)
        q_mask = (rows[:, None] < Tq) & (d[None, :] < HS)
        q = tl.load(Q + b * sq[0] + h * sq[1] + rows[:, None] * sq[2] + d[None, :] * sq[3],
                    mask=q_mask, other=0.0)
        do = tl.load(dO + b * sdo[0] + h * sdo[1] + rows[:, None] * sdo[2] + d[None, :] * sdo[3],
                     mask=q_mask, other=0.0)
        Li = tl.load(L + (b * nh + h) * Tq + rows, mask=rows < Tq, other=0.0)
        Di = tl.load(D + (b * nh + h) * Tq + rows, mask=rows < Tq, other=0.0)
        dq = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
        offset = Tk - Tq
        end = Tk
        if CAUSAL:
            end = tl.minimum(Tk, offset + (tl.program_id(0) + 1) * BLOCK_M)
        for j0 in range(0, end, BLOCK_N):
            j = j0 + tl.arange(0, BLOCK_N)
            kv_mask = (j[:, None] < Tk) & (d[None, :] < HS)
            k = tl.load(K + b * sk[0] + kvh * sk[1] + j[:, None] * sk[2] + d[None, :] * sk[3],
                        mask=kv_mask, other=0.0)
            v = tl.load(V + b * sv[0] + kvh * sv[1] + j[:, None] * sv[2] + d[None, :] * sv[3],
                        mask=kv_mask, other=0.0)
            visible = (rows[:, None] < Tq) & (j[None, :] < Tk)
            if CAUSAL:
                visible = visible & (j[None, :] <= offset + rows[:, None])
            p = tl.where(visible, tl.exp(tl.dot(q, tl.trans(k)) * scale - Li[:, None]), 0.0)  # P = e^(S - L)
            ds = p * (tl.dot(do, tl.trans(v)) - Di[:, None])  # (2), (3)
            dq += tl.dot(ds.to(k.dtype), k) * scale  # (4) dQ += dS K / sqrt(hs)
        tl.store(dQ + b * sq[0] + h * sq[1] + rows[:, None] * sq[2] + d[None, :] * sq[3],
                 dq.to(dQ.dtype.element_ty), mask=q_mask)

    _KERNELS = (triton, flash_fwd, flash_bwd_dkdv, flash_bwd_dq)
    return _KERNELS


def triton_inputs(*tensors):
    """Check where the kernels can run; under the interpreter, bf16 runs in fp32."""
    if not (tensors[0].is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise RuntimeError("the Triton kernels need a CUDA GPU; on a CPU set TRITON_INTERPRET=1 "
                           "before triton is imported (slow: for tests), or use attn_impl='flash'")
    if os.environ.get("TRITON_INTERPRET") == "1" and tensors[0].dtype == torch.bfloat16:
        # subtle: the interpreter's bf16 tl.dot gives wrong results (a known upstream bug).
        return [t.float() for t in tensors]
    return tensors


def triton_forward(q, k, v, causal=True, block_q=32, block_k=32):
    """flash_forward's (O, L), computed by a Triton kernel. Blocks must be >= 16 (tl.dot)."""
    triton, fwd, _, _ = triton_kernels()
    dtype = q.dtype
    q, k, v = triton_inputs(q, k, v)
    B, nh, Tq, hs = q.shape
    o = torch.empty_like(q)
    L = torch.empty(B, nh, Tq, dtype=torch.float32, device=q.device)
    fwd[(triton.cdiv(Tq, block_q), B * nh)](
        q, k, v, o, L, q.stride(), k.stride(), v.stride(), o.stride(), Tq, k.size(2), nh,
        nh // k.size(1), 1.0 / math.sqrt(hs), HS=hs, CAUSAL=causal, BLOCK_M=block_q,
        BLOCK_N=block_k, BLOCK_D=max(16, triton.next_power_of_2(hs)))
    return o.to(dtype), L


def triton_backward(do, q, k, v, o, L, causal=True, block_q=32, block_k=32):
    """flash_backward's (dQ, dK, dV), computed by two Triton kernels: one program per key
    tile for dK, dV, one per query tile for dQ. Each recomputes its P tiles: S and dP are
    computed twice, the price of needing no atomic adds (FlashAttention-2 adds dQ atomically)."""
    triton, _, bwd_dkdv, bwd_dq = triton_kernels()
    dtypes = q.dtype, k.dtype, v.dtype
    do, q, k, v, o = triton_inputs(do, q, k, v, o)
    B, nh, Tq, hs = q.shape
    nkv, Tk = k.size(1), k.size(2)
    D = (do.float() * o.float()).sum(-1)  # (B, nh, Tq): (3)'s rowsum(dO o O), one elementwise pass
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    args = (q.stride(), k.stride(), v.stride(), do.stride(), Tq, Tk, nh, nh // nkv, 1.0 / math.sqrt(hs))
    consts = dict(HS=hs, CAUSAL=causal, BLOCK_M=block_q, BLOCK_N=block_k,
                  BLOCK_D=max(16, triton.next_power_of_2(hs)))
    bwd_dkdv[(triton.cdiv(Tk, block_k), B * nkv)](q, k, v, do, L, D, dk, dv, *args, **consts)
    bwd_dq[(triton.cdiv(Tq, block_q), B * nh)](q, k, v, do, L, D, dq, *args, **consts)
    return dq.to(dtypes[0]), dk.to(dtypes[1]), dv.to(dtypes[2])


def triton_attention(q, k, v, causal=True, block_q=32, block_k=32):
    """flash_attention computed by the Triton kernels, forward and backward."""
    check_shapes(q, k, v, causal)
    return FlashAttention.apply(q, k, v, causal, (block_q, block_k), (triton_forward, triton_backward))
#< L15
