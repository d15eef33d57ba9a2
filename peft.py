#> L14 peft
"""
peft.py -- parameter-efficient fine-tuning: LoRA and QLoRA, written out.

Fine-tuning every weight needs the weights, their gradients and two Adam
moments: 16 bytes per parameter in fp32. LoRA (Hu et al. 2021) freezes the
model and learns a low-rank update beside chosen Linear layers,
    y = W x + (alpha / r) * B A x,     A: (r, in), B: (out, r), r << in, out,
so only A and B train. QLoRA (Dettmers et al. 2023) also stores the frozen W
in 4 bits ("NormalFloat", NF4) and dequantizes it on the fly.

Everything here is checked against the libraries everyone uses: an adapter
saved by save_adapter() loads into Hugging Face `peft` and gives our logits,
and nf4_quantize/nf4_dequantize equal bitsandbytes' quantize_4bit /
dequantize_4bit bit for bit on the CPU (tests/test_l14_peft.py).

    model = apply_lora(CausalLM(cfg), r=8, alpha=16)     # only A, B train
    packed, state = nf4_quantize(W); W4 = nf4_dequantize(packed, state)
    python bench.py quant       # bytes per parameter, tiny and Qwen3-0.6B; NF4 error

subtle: this file is called peft.py, so a Python started in this folder
imports it instead of the `peft` library (sys.path[0] is the script's folder);
the library, and bitsandbytes (which imports a `kernels` module, a name
kernels.py here also takes), must run in a process started elsewhere:
bench.run_outside_repo().
"""

import contextlib
import json
import math
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import CausalLM, preset
from hf import hf_weight_map, read_safetensors, write_safetensors

# -----------------------------------------------------------------------------
# LoRA: a trainable low-rank update beside a frozen matrix


class LoRAPair:
    """The A, B pair and its scaling, shared by LoRALinear and QLoRALinear.

    Hypothesis (Hu et al. 2021, after Aghajanyan et al. 2020): the change
    fine-tuning makes to a pretrained W has low "intrinsic rank", so
    dW = B A with rank r loses little. Parameters per layer: r (in + out)
    instead of in * out -- 2 * 8 * 128 = 2048 vs 16384 for a 128x128 layer.
    """

    def init_lora(self, r, alpha, dropout, rslora, device, dtype):
        if r <= 0:
            raise ValueError(f"LoRA rank r={r} must be a positive integer (r=0 means: no LoRA)")
        self.r, self.alpha, self.rslora = r, alpha, rslora
        # alpha / r keeps the update's size independent of r: with A ~ U(+-1/sqrt(in)),
        # B A x sums r terms, so doubling r would double the step's effect at a fixed
        # learning rate. rsLoRA (Kalajdzievski 2023) argues alpha / sqrt(r) is the
        # scale that keeps learning stable as r grows.
        self.scaling = alpha / (math.sqrt(r) if rslora else r)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=dtype))
        # A as nn.Linear initialises its weight (and as PEFT initialises lora_A):
        # Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)).
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        # B = 0, so B A = 0: training starts from exactly the pretrained model, and
        # the first gradient reaches B (dL/dB = g (A x)^T is not 0) though not A.
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_enabled = True  # lora_disabled() turns this off
        self.merged = False

    #> L14 lora-update exercise
    def lora_update(self, x):
        """(alpha/r) B A drop(x): (..., in) -> (..., out), two thin matmuls.

        Never forms B A (out x in): x A^T is (..., r), cheap for small r.
        """
        return F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling

    def delta_weight(self):
        """dW = (alpha/r) B A, shape (out, in): what merging adds to W."""
        return (self.lora_B @ self.lora_A) * self.scaling
    #< L14

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, r={self.r}, alpha={self.alpha}"


class LoRALinear(LoRAPair, nn.Linear):
    """A frozen nn.Linear plus a LoRA pair: y = W x + b + (alpha/r) B A drop(x).

    It is an nn.Linear holding the base layer's own weight and bias (the same
    tensors, not copies), so parameter names stay `...q_proj.weight` and
    model code that reads `.weight` keeps working.
    """

    def __init__(self, base, r, alpha, dropout=0.0, rslora=False):
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a new weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        base.requires_grad_(False)  # W and b stay as pretrained
        self.init_lora(r, alpha, dropout, rslora, base.weight.device, base.weight.dtype)

    #> L14 lora-forward exercise
    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.merged or not self.lora_enabled:  # merged: W already holds B A
            return y
        return y + self.lora_update(x)

    @torch.no_grad()
    def merge(self):
        """W <- W + dW: inference then costs what the base model costs."""
        if not self.merged:
            self.weight += self.delta_weight().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """W <- W - dW. subtle: (W + dW) - dW equals W only up to fp32 rounding,
        a few units in the last place where |dW| is large; B = 0 restores W exactly."""
        if self.merged:
            self.weight -= self.delta_weight().to(self.weight.dtype)
            self.merged = False
    #< L14


# -----------------------------------------------------------------------------
# Choosing the layers, freezing the rest


def linear_names(model, head=False):
    """Names of the Linear layers LoRA may wrap; "all-linear" means every one but lm_head.

    Not the output head by default: it maps to the whole vocabulary (V x r
    extra parameters, 151936 x 8 for Qwen3), it is tied to the token
    embedding here (an update would change the logits but not the input
    embeddings, and merging it would rewrite the embedding), and the task's
    new behaviour is learned in the blocks. PEFT's "all-linear" leaves it out too.
    """
    return [name for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, QLoRALinear)) and (head or name != "lm_head")]


def select_targets(model, targets):
    """Names of the Linear layers that `targets` chooses: "all-linear"; a list of names
    each matching a full name or its ending (["q_proj", "mlp.up"], as PEFT matches); or a
    regular expression matched against the whole name ("blocks\\.0\\..*")."""
    names = linear_names(model, head=targets != "all-linear")
    if targets == "all-linear":
        chosen = names
    elif isinstance(targets, str):
        chosen = [n for n in names if re.fullmatch(targets, n)]
    else:
        chosen = [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]
    if not chosen:
        raise ValueError(f"targets={targets!r} matches none of the Linear layers {names[:8]}...; "
                         "give names like ['q_proj', 'v_proj'], a regex, or 'all-linear'")
    return chosen


def inject(model, targets, make):
    """Replace every targeted Linear by make(linear); freeze all but the new LoRA pairs."""
    chosen = select_targets(model, targets)
    uses = {}  # how many names each tensor has: 2 for a tied matrix
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    for name in chosen:
        linear = model.get_submodule(name)
        if isinstance(linear, LoRAPair):
            raise ValueError(f"{name} already carries a LoRA pair; apply LoRA once per model")
        if uses[id(linear.weight)] > 1:  # merging would rewrite its twin (the embedding) too
            raise ValueError(f"{name}.weight is tied to another parameter; leave {name} out")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, make(linear))
    for p in model.parameters():
        p.requires_grad_(False)
    for p in lora_parameters(model):
        p.requires_grad_(True)
    return model


def apply_lora(model, r, alpha, targets="all-linear", dropout=0.0, rslora=False):
    """Wrap the targeted Linear layers in LoRALinear (in place) and freeze the rest.

    >>> m = apply_lora(CausalLM(preset("tiny")), r=8, alpha=16)
    >>> sum(p.numel() for p in m.parameters() if p.requires_grad)   # 8 * (in + out) per layer
    78848
    """
    return inject(model, targets, lambda lin: LoRALinear(lin, r, alpha, dropout, rslora))


def lora_modules(model):
    """[(name, module)] of the LoRALinear / QLoRALinear layers, in model order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRAPair)]


def lora_parameters(model):
    """What trains: every A and B, and the deltas of trainable token rows."""
    return [p for _, m in lora_modules(model) for p in (m.lora_A, m.lora_B)] + \
        [m.delta for _, m in token_rows(model)]


def base_param_count(model):
    """Parameters of the base model under the adapters (its NF4 weights included)."""
    return model.num_params() - sum(p.numel() for p in lora_parameters(model))


def lora_state_dict(model):
    """{name: tensor} of the A and B matrices (and token-row deltas) alone: the whole of
    what training changed."""
    return {**{f"{n}.{k}": getattr(m, k).detach() for n, m in lora_modules(model)
               for k in ("lora_A", "lora_B")},
            **{f"{n}.delta": m.delta.detach() for n, m in token_rows(model)}}


def merge_lora(model):
    """Fold every B A into its W (in place); the model then runs at base-model cost."""
    for name, m in lora_modules(model):
        if isinstance(m, QLoRALinear):
            raise ValueError(f"{name} is 4-bit: adding B A to an NF4 weight would requantize it; "
                             "merge into a full-precision copy of the base model instead")
        m.merge()
    for m in row_layers(model):
        m.token_rows.merge(m.weight)  # tied: the shared rows merge once
    return model


def unmerge_lora(model):
    for _, m in lora_modules(model):
        m.unmerge()
    for m in row_layers(model):
        m.token_rows.unmerge(m.weight)
    return model


@contextlib.contextmanager
def lora_disabled(model):
    """Inside, every LoRA layer acts as its base layer: the model is the base model.

    The reference model of DPO/PPO/GRPO with LoRA, for free: pi_ref = the
    frozen base, which is exactly this model with B A switched off -- no
    second copy of the weights.
    """
    mods = [m for _, m in lora_modules(model) + token_rows(model)]
    if any(m.merged for m in mods):
        raise ValueError("the adapter is merged into the weights; unmerge_lora(model) first")
    before = [m.lora_enabled for m in mods]
    for m in mods:
        m.lora_enabled = False
    try:
        yield model
    finally:
        for m, was in zip(mods, before):
            m.lora_enabled = was


# -----------------------------------------------------------------------------
# New tokens: a few trainable rows of the frozen embedding
#
# A base model has never seen the chat template's tokens (<|assistant_end|>
# ...): their embedding rows are what pretraining left of a random init. Full
# SFT trains them; LoRA, with the embedding frozen, cannot, so its replies do
# not learn to stop. The fix (PEFT's trainable_token_indices): train a delta
# for those rows only, V x C frozen, k x C trained. With a tied head the same
# delta moves the output rows too.


class TokenRows(nn.Module):
    """weight -> weight with rows `ids` moved by a trainable delta (k, C), zero at init."""

    def __init__(self, weight, ids):
        super().__init__()
        self.register_buffer("ids", torch.tensor(sorted(set(ids)), dtype=torch.long, device=weight.device))
        self.delta = nn.Parameter(torch.zeros(len(self.ids), weight.shape[1], dtype=weight.dtype,
                                              device=weight.device))
        self.lora_enabled, self.merged = True, False

    def forward(self, weight):
        if self.merged or not self.lora_enabled:
            return weight
        return weight.index_add(0, self.ids, self.delta)  # (V, C): a new tensor, W untouched

    @torch.no_grad()
    def merge(self, weight):
        if not self.merged:
            weight.index_add_(0, self.ids, self.delta)
            self.merged = True

    @torch.no_grad()
    def unmerge(self, weight):
        if self.merged:
            weight.index_add_(0, self.ids, -self.delta)
            self.merged = False


class EmbeddingRows(nn.Embedding):
    """The token embedding, its weight shared and frozen, its chosen rows trainable."""

    def __init__(self, base, rows):
        nn.Module.__init__(self)  # keep the base's weight: no new table
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.padding_idx, self.max_norm, self.sparse = None, None, False
        self.norm_type, self.scale_grad_by_freq = 2.0, False
        self.weight, self.token_rows = base.weight, rows

    def forward(self, idx):
        return F.embedding(idx, self.token_rows(self.weight))


class HeadRows(nn.Linear):
    """The output head with the same rows trainable (the same TokenRows when tied)."""

    def __init__(self, base, rows):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias, self.token_rows = base.weight, base.bias, rows

    def forward(self, x):
        return F.linear(x, self.token_rows(self.weight), self.bias)


def train_token_rows(model, ids):
    """Make the embedding rows (and output-head rows) of tokens `ids` trainable, in place."""
    rows = TokenRows(model.tok_emb.weight, ids)
    tied = model.lm_head.weight is model.tok_emb.weight
    model.tok_emb = EmbeddingRows(model.tok_emb, rows)
    model.lm_head = HeadRows(model.lm_head, rows if tied else TokenRows(model.lm_head.weight, ids))
    return model


def row_layers(model):
    return [m for m in model.modules() if isinstance(m, (EmbeddingRows, HeadRows))]


def token_rows(model):
    """[(name, TokenRows)], a shared (tied) one listed once."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TokenRows)]


# -----------------------------------------------------------------------------
# Adapters on disk, in PEFT's format
#
# A folder with adapter_config.json and adapter_model.safetensors whose keys
# are the transformers model's module names under "base_model.model.", e.g.
#   base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight  (r, in)
# so that after CausalLM.save_pretrained() the peft library can load it:
#   PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)


def hf_module_names(cfg):
    """{our Linear's name: the transformers module's name}, from model.hf_weight_map."""
    if cfg.pos_emb == "learned":
        raise ValueError("adapters are written for Llama/Qwen3-style models; GPT-2 stacks q, k, v "
                         "in one Conv1D, which a LoRA pair per projection cannot express")
    kind = "qwen3" if cfg.qk_norm else "llama"  # as CausalLM.save_pretrained chooses
    return {ours[0].removesuffix(".weight"): theirs.removesuffix(".weight")
            for theirs, ours, _ in hf_weight_map(cfg, kind) if len(ours) == 1}


def save_adapter(model, path, base_model=None):
    """Write the LoRA pairs alone to the folder `path` (a few hundred KB for tiny)."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA layers; apply_lora(model, ...) first")
    if token_rows(model):
        raise ValueError("trainable token rows are kept in our checkpoints only; merge_lora(model) "
                         "then save_pretrained to export the model")
    if len({(m.r, m.alpha, m.rslora) for _, m in mods}) > 1:
        raise ValueError("PEFT's config holds one r and alpha; these layers differ")
    names, m0 = hf_module_names(model.cfg), mods[0][1]
    tensors = {}
    for n, m in mods:
        tensors[f"base_model.model.{names[n]}.lora_A.weight"] = m.lora_A
        tensors[f"base_model.model.{names[n]}.lora_B.weight"] = m.lora_B
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": m0.r, "lora_alpha": m0.alpha,
              "use_rslora": m0.rslora, "target_modules": sorted(names[n] for n, _ in mods),
              "lora_dropout": getattr(m0.lora_dropout, "p", 0.0), "bias": "none",
              "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
              "modules_to_save": None, "base_model_name_or_path": base_model and str(base_model)}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(path / "adapter_model.safetensors", tensors)
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))


def load_adapter(model, path):
    """Load an adapter folder onto `model`; wraps its layers first if it has no LoRA yet.

    Strict: every LoRA layer must find its A and B, and every tensor its layer.
    """
    path = Path(path)
    if not (path / "adapter_config.json").exists():
        raise FileNotFoundError(f"{path} has no adapter_config.json: not an adapter folder")
    config = json.loads((path / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA")
    ours = {theirs: n for n, theirs in hf_module_names(model.cfg).items()}
    if not lora_modules(model):
        targets = [ours[t] for t in config["target_modules"] if t in ours]
        apply_lora(model, config["r"], config["lora_alpha"], targets or config["target_modules"],
                   config.get("lora_dropout", 0.0), config.get("use_rslora", False))
    tensors = read_safetensors(path / "adapter_model.safetensors")
    expected = {f"base_model.model.{hf}.{k}.weight": (n, k) for hf, n in ours.items()
                for k in ("lora_A", "lora_B")}
    wanted = {f"{n}.{k}" for n, _ in lora_modules(model) for k in ("lora_A", "lora_B")}
    got = {f"{expected[key][0]}.{expected[key][1]}": t for key, t in tensors.items() if key in expected}
    if set(got) != wanted or len(got) != len(tensors):
        raise ValueError(f"{path}: adapter tensors do not match the model's LoRA layers "
                         f"(missing {sorted(wanted - set(got))[:3]}, unknown "
                         f"{sorted(k for k in tensors if k not in expected)[:3]})")
    with torch.no_grad():
        for name, t in got.items():
            model.get_parameter(name).copy_(t)
    return model


# -----------------------------------------------------------------------------
# NF4: a 4-bit code with equal-probability bins for normally distributed weights
#
# Weights are close to N(0, sigma). QLoRA's NormalFloat puts the 16 code
# values at quantiles of N(0, 1), so each of the 16 bins receives about the
# same share of the weights ("information-theoretically optimal" for normal
# data), then scales them into [-1, 1]. Per block of 64 weights one absmax
# c = max |w| is kept; w is stored as the index of the code value nearest to
# w / c, and read back as code[index] * c.

NF4_OFFSET = 0.9677083  # 1 - delta, delta = (1/(2*15) + 1/(2*16)) / 2 (QLoRA, eq. 4), to 7 digits
NF4_BLOCK = 64  # weights per absmax (QLoRA's block size)
DQ_BLOCK = 256  # absmax values per second-level constant in double quantization


def nf4_code(offset=NF4_OFFSET):
    """The 16 NF4 values from quantiles of N(0, 1) (Dettmers et al. 2023, sec. 3).

    Two halves so that 0 is exactly representable (padding and zero weights
    stay 0): 8 positive values at quantiles evenly spaced from 0.5 to offset
    (0.5 itself, quantile 0, dropped), 7 negative ones from an 8-point grid
    likewise, and 0. Asymmetric: 8 positive, 7 negative, max 1 and min -1
    after dividing by the largest, Phi^-1(offset) = 1.848.
    >>> nf4_code()[[0, 7, 8, 15]]
    tensor([-1.0000,  0.0000,  0.0796,  1.0000])

    subtle: the grid is built in float32 and offset is the 7-digit 0.9677083
    bitsandbytes uses; the exact 0.96770833.. moves two values by 1 ulp.
    """
    quantile = lambda p: torch.special.ndtri(p.double()).float()  # Phi^-1, the inverse normal CDF
    pos = quantile(torch.linspace(offset, 0.5, 9)[:-1])  # 8 values, largest first
    neg = -quantile(torch.linspace(offset, 0.5, 8)[:-1])  # 7 values
    code = torch.cat([neg, torch.zeros(1), pos]).sort().values  # (16,)
    return code / code.max()


def dynamic_code():
    """bitsandbytes' signed 8-bit "dynamic" code (Dettmers 2015, "8-bit approximations").

    A float with a variable split between exponent and fraction: a value is
    sign * 10^-e * f, and the fewer leading zeros e, the more bits are left
    for f. For e = 6 - i, i = 0..6, 2^i fractions f at the midpoints of 2^i
    equal bins of [0.1, 1]: 1 + 2 + .. + 64 = 127 magnitudes, times two signs,
    plus 0 and 1: 256 values spanning 5.5e-7 .. 1 with ~2 digits each
    (asymmetric: +1 is there, -1 is not).
    >>> c = dynamic_code(); c[0], c[126], c[127], c[128], c[-1]
    (tensor(-0.9930), tensor(-5.5000e-07), tensor(0.), tensor(5.5000e-07), tensor(1.))
    """
    values = [torch.zeros(1), torch.ones(1)]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2 ** i + 1)  # 2^i bins of [0.1, 1]
        f = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (i - 6)
        values += [f, -f]
    return torch.cat(values).sort().values  # (256,), increasing


NF4_CODE = nf4_code()
DYNAMIC_CODE = dynamic_code()


def blockwise_absmax(x, blocksize):
    """(n,) -> (n_blocks, blocksize) zero-padded view and each block's max |x|.

    >>> blockwise_absmax(torch.tensor([1., -3, 2]), 2)[1]
    tensor([3., 2.])
    """
    n = x.numel()
    blocks = F.pad(x, (0, -n % blocksize)).view(-1, blocksize)  # (n_blocks, blocksize)
    return blocks, blocks.abs().amax(dim=1)


# The 8-bit quantizer bitsandbytes' CPU kernel uses for the absmax values: it
# does not search the code; it reads the nearest index from a table over
# 65536 evenly spaced points of [-1, 1], built once per code. Rounding
# through that grid (step 3e-5) is coarser than the code near 0 (steps of
# 1e-6), so a true nearest-value search would differ for tiny values: to be
# bit-exact we quantize through the same grid.
LUT_SIZE = 65536


def _grid_table(code):
    """For each grid point -1 + 2i/65535, the index of the nearest code value."""
    mids = (code[:-1] + code[1:]) * 0.5  # (255,) decision boundaries
    grid = -1.0 + (2.0 * torch.arange(LUT_SIZE, dtype=torch.float32)) / (LUT_SIZE - 1)
    return torch.searchsorted(mids, grid).to(torch.uint8)  # ties go to the lower index


DYNAMIC_TABLE = _grid_table(DYNAMIC_CODE)


def quantize_blockwise_8bit(x, blocksize=DQ_BLOCK):
    """fp32 (n,) -> (uint8 indices into DYNAMIC_CODE (n,), fp32 absmax per block)."""
    n = x.numel()
    blocks, absmax = blockwise_absmax(x.float().reshape(-1), blocksize)
    inv = torch.where(absmax > 0, 1.0 / absmax, 0.0)  # an all-zero block stores index 0
    t = ((blocks * inv[:, None]).clamp(-1, 1) + 1.0) * 0.5  # [-1, 1] -> [0, 1]
    # subtle: the kernel computes t * 65535 + 0.5 as one fused multiply-add (one rounding,
    # emulated in float64), rounds that to float32, then truncates to an integer.
    pos = (t.double() * (LUT_SIZE - 1) + 0.5).float().long()  # (n_blocks, blocksize)
    q = DYNAMIC_TABLE.to(x.device)[pos].masked_fill(absmax[:, None] == 0, 0)  # tables live on the CPU
    return q.reshape(-1)[:n], absmax


def dequantize_blockwise_8bit(q, absmax, blocksize=DQ_BLOCK):
    n = q.numel()
    values = F.pad(DYNAMIC_CODE.to(q.device)[q.long()], (0, -n % blocksize)).view(-1, blocksize)
    return (values * absmax[:, None]).reshape(-1)[:n]


#> L14 nf4 exercise
def nf4_quantize(W, double_quant=False, blocksize=NF4_BLOCK):
    """W (any shape; fp32/fp16/bf16) -> (packed uint8 ((n+1)//2,), state dict).

    Per block of 64: absmax c, then each w/c goes to the nearest of the 16 NF4
    values (decision boundaries at the midpoints); two 4-bit indices per byte,
    the first element in the high nibble, as bitsandbytes packs them.
    double_quant (QLoRA sec. 3): the fp32 absmax values (32 bits per 64
    weights = 0.5 bit/param) are themselves quantized to 8 bits in blocks of
    256 after subtracting their mean (they are all positive, the 8-bit code
    is symmetric), leaving 8/64 + 32/(64*256) = 0.127 bit/param.
    >>> p, s = nf4_quantize(torch.tensor([[0.5, -1.0, 0.0]]))
    >>> p, s["absmax"]           # indices 12 (0.5 -> 0.4407), 0 (-1), 7 (0); pad 7
    (tensor([192, 119], dtype=torch.uint8), tensor([1.]))
    """
    x = W.detach().reshape(-1).float()  # (n,)
    n = x.numel()
    blocks, absmax = blockwise_absmax(x, blocksize)  # (n_blocks, 64), (n_blocks,)
    # subtle: bitsandbytes multiplies full blocks by 1/c but divides the last partial
    # block by c; the two round differently, so we do the same. An all-zero block
    # gets c = 1e-38 for the division and stores 0 (index 7).
    scaled = blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]
    if n % blocksize:
        scaled[-1] = blocks[-1] / absmax[-1].clamp(min=1e-38)
    scaled = scaled.clamp(-1, 1).reshape(-1)[:n]
    scaled = F.pad(scaled, (0, n % 2))  # odd n: the last byte's low nibble encodes 0.0
    code = NF4_CODE.to(x.device)
    idx = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2).to(torch.uint8)  # (n,)
    packed = (idx[0::2] << 4) | idx[1::2]  # ((n+1)//2,) two indices per byte
    state = {"absmax": absmax, "shape": tuple(W.shape), "dtype": W.dtype, "blocksize": blocksize}
    if double_quant:
        offset = absmax.mean()
        state["absmax"], state["absmax2"] = quantize_blockwise_8bit(absmax - offset)
        state["offset"] = offset
    return packed, state


def nf4_dequantize(packed, state, dtype=None):
    """The inverse: code[index] * c in fp32, then one rounding to dtype (default: W's)."""
    absmax = state["absmax"]
    if "absmax2" in state:  # double quantization: first recover the fp32 absmax values
        absmax = dequantize_blockwise_8bit(absmax, state["absmax2"]) + state["offset"]
    n = math.prod(state["shape"])
    idx = torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(-1)[:n]  # (n,) high nibble first
    blocks, _ = blockwise_absmax(NF4_CODE.to(packed.device)[idx.long()], state["blocksize"])
    W = (blocks * absmax[:, None]).reshape(-1)[:n]  # (n_blocks, 64) -> (n,)
    return W.to(dtype or state["dtype"]).reshape(state["shape"])
#< L14


# -----------------------------------------------------------------------------
# QLoRA: a frozen NF4 weight plus a LoRA pair


class NF4Matmul(torch.autograd.Function):
    """x W^T with W stored in NF4: dequantize in forward, and again in backward.

    subtle: F.linear(x, nf4_dequantize(...)) would keep every layer's
    dequantized W alive for the backward pass -- the whole model in full
    precision again. Recomputing it costs one more dequantization per layer
    and keeps only the 4-bit copy in memory (bitsandbytes does the same).
    W is frozen, so only the gradient with respect to x is needed.
    """

    @staticmethod
    def forward(ctx, x, packed, state):
        ctx.packed, ctx.state = packed, state
        return F.linear(x, nf4_dequantize(packed, state, x.dtype))

    @staticmethod
    def backward(ctx, grad):  # dL/dx = dL/dy W; nothing for the buffers
        return grad @ nf4_dequantize(ctx.packed, ctx.state, grad.dtype), None, None


class QLoRALinear(LoRAPair, nn.Module):
    """y = dequant(W4) x + b + (alpha/r) B A drop(x), W4 frozen in NF4.

    The 4-bit weight, its absmax values (8-bit with double quantization) and
    the second-level constants are buffers: saved with the model, moved by
    .to(), never trained. Each forward dequantizes W in the input's dtype.
    """

    def __init__(self, base, r, alpha, dropout=0.0, rslora=False, double_quant=True):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        packed, state = nf4_quantize(base.weight, double_quant)
        self.register_buffer("weight_packed", packed)
        for key in ("absmax", "absmax2", "offset"):
            if key in state:
                self.register_buffer(key, state[key])
        self.weight_shape, self.weight_dtype = state["shape"], state["dtype"]
        self.bias = base.bias  # frozen like the rest of the base model
        base.requires_grad_(False)
        self.init_lora(r, alpha, dropout, rslora, base.weight.device, base.weight.dtype)

    def quant_state(self):
        state = {"shape": self.weight_shape, "dtype": self.weight_dtype, "blocksize": NF4_BLOCK,
                 "absmax": self.absmax}
        if hasattr(self, "absmax2"):
            state.update(absmax2=self.absmax2, offset=self.offset)
        return state

    def forward(self, x):
        y = NF4Matmul.apply(x, self.weight_packed, self.quant_state())  # (..., out)
        y = y if self.bias is None else y + self.bias
        return y + self.lora_update(x) if self.lora_enabled else y


def apply_qlora(model, r, alpha, targets="all-linear", dropout=0.0, rslora=False, double_quant=True):
    """Quantize the targeted Linear layers to NF4 (in place) and give each a LoRA pair."""
    return inject(model, targets, lambda lin: QLoRALinear(lin, r, alpha, dropout, rslora, double_quant))


if __name__ == "__main__":  # the memory table and the NF4 check moved to the performance table
    raise SystemExit("peft.py has no command: its memory table and NF4 check are `python bench.py quant`")
#< L14
