#> L14 tests
"""Lesson 14: LoRA (init, gradients, merge, adapters in PEFT's format), NF4 and QLoRA.

The oracles, Hugging Face `peft` and bitsandbytes, run in a subprocess started
outside the repository: here `import peft` is our peft.py, and bitsandbytes'
`import kernels` would find kernels.py.
"""

import importlib.metadata
import json
import math
import shutil
import statistics

import pytest
import torch

import bench
import hf
import peft as P
import run
import sft
from model import CausalLM, ModelConfig
from run import chat_exact_match, load_checkpoint, save_checkpoint
from conftest import run_doctests
from test_l10_sft import FACTS, base, sft_config  # noqa: F401 (base is a fixture)
from test_l11_dpo import tiny_run  # noqa: F401 (a fixture)
from test_l12_ppo import rl_cfg


def installed(name):
    """Is the library installed? (find_spec would find our own peft.py first)"""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


needs_bnb = pytest.mark.skipif(not installed("bitsandbytes"),
                               reason="bitsandbytes not installed: pip install -r requirements-dev.txt")
needs_peft = pytest.mark.skipif(not (installed("peft") and installed("transformers")),
                                reason="peft/transformers not installed: pip install -r requirements-dev.txt")


def tiny_cfg(**kw):
    return ModelConfig(**{**dict(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_kv_head=2,
                                 n_embd=32, qk_norm=True), **kw})


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return CausalLM(tiny_cfg(**kw)).eval()


def randomize_lora(model, seed=1):
    """Give every B (and A) random values, as after training; at init B A = 0 hides bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in P.lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: on shared cores extra threads only wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


IDX = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))


# -----------------------------------------------------------------------------
# LoRA


def test_lora_at_init_changes_nothing():
    """Guards against a nonzero B at init (training would not start from the base model)
    and against the wrong A init: PEFT's Kaiming-uniform(a=sqrt(5)) is U(+-1/sqrt(in))."""
    model = tiny_model()
    before, _ = model(IDX)
    P.apply_lora(model, r=4, alpha=8)
    after, _ = model(IDX)
    assert torch.equal(before, after)
    m = model.blocks[0].mlp.down
    bound = 1 / math.sqrt(m.in_features)
    assert torch.count_nonzero(m.lora_B) == 0
    assert m.lora_A.abs().max() <= bound and m.lora_A.abs().max() > 0.8 * bound
    assert m.lora_A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15)  # uniform's std


def test_only_A_and_B_train_and_B_moves_first():
    """Guards against forgetting to freeze the base (full fine-tuning in disguise), and
    shows why B = 0 works: the first gradient reaches B but is exactly 0 for A."""
    model = P.apply_lora(tiny_model(), r=4, alpha=8)
    _, loss = model(IDX, IDX)
    loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    for _, m in P.lora_modules(model):
        assert torch.count_nonzero(m.lora_A.grad) == 0
        assert torch.count_nonzero(m.lora_B.grad) > 0
    expected = 2 * (2 * 4 * (32 + 32) + 2 * 4 * (32 + 16) + 3 * 4 * (32 + model.cfg.n_inner))
    assert sum(p.numel() for p in P.lora_parameters(model)) == expected


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_linear_is_the_formula(rslora):
    """Guards against a wrong scale (alpha/r vs alpha/sqrt(r)) or order of A and B."""
    torch.manual_seed(0)
    base = torch.nn.Linear(20, 12)
    lin = P.LoRALinear(base, r=4, alpha=6, rslora=rslora)
    randomize_lora(lin)
    x = torch.randn(3, 5, 20)
    scale = 6 / (2 if rslora else 4)
    ref = x @ base.weight.T + base.bias + scale * (x @ lin.lora_A.T @ lin.lora_B.T)
    torch.testing.assert_close(lin(x), ref, rtol=0, atol=1e-6)
    assert lin.weight is base.weight  # the same tensor, not a copy


def test_merge_equals_unmerged_and_unmerge_restores():
    """Guards against merging the wrong product (A B, a transpose) or scale, and against
    unmerge drifting away from W by more than rounding."""
    model = P.apply_lora(tiny_model(), r=4, alpha=8)
    randomize_lora(model)
    W0 = {n: m.weight.clone() for n, m in P.lora_modules(model)}
    ref, _ = model(IDX)
    P.merge_lora(model)
    merged, _ = model(IDX)
    torch.testing.assert_close(merged, ref, rtol=0, atol=1e-6)
    assert not torch.equal(model.blocks[0].attn.q_proj.weight, W0["blocks.0.attn.q_proj"])
    with pytest.raises(ValueError, match="unmerge"):
        with P.lora_disabled(model):
            pass
    P.unmerge_lora(model)
    for n, m in P.lora_modules(model):
        ulp = torch.finfo(torch.float32).eps * (W0[n].abs() + m.delta_weight().abs())
        assert ((m.weight - W0[n]).abs() <= ulp).all()
    torch.testing.assert_close(model(IDX)[0], ref, rtol=0, atol=1e-6)


def test_lora_disabled_gives_the_base_model():
    """Guards against a reference model (DPO/PPO/GRPO) that still sees the adapter, or an
    adapter left off after the block."""
    model = tiny_model()
    base, _ = model(IDX)
    P.apply_lora(model, r=4, alpha=8)
    randomize_lora(model)
    tuned, _ = model(IDX)
    with P.lora_disabled(model):
        assert torch.equal(model(IDX)[0], base)
    assert torch.equal(model(IDX)[0], tuned) and not torch.equal(tuned, base)


def test_targets_list_regex_and_all_linear():
    """Guards against all-linear wrapping the output head, regexes matching partially and
    a typo silently training nothing."""
    names = lambda m: [n for n, _ in P.lora_modules(m)]
    m = P.apply_lora(tiny_model(), 2, 4)
    assert "lm_head" not in names(m) and len(names(m)) == 2 * 7
    assert names(P.apply_lora(tiny_model(), 2, 4, ["q_proj", "mlp.up"])) == \
        ["blocks.0.attn.q_proj", "blocks.0.mlp.up", "blocks.1.attn.q_proj", "blocks.1.mlp.up"]
    assert names(P.apply_lora(tiny_model(), 2, 4, r"blocks\.1\.attn\..*")) == \
        [f"blocks.1.attn.{x}_proj" for x in "qkvo"]
    with pytest.raises(ValueError, match="matches none"):
        P.apply_lora(tiny_model(), 2, 4, ["qproj"])
    with pytest.raises(ValueError, match="tied"):
        P.apply_lora(tiny_model(), 2, 4, ["lm_head"])
    with pytest.raises(ValueError, match="positive"):
        P.apply_lora(tiny_model(), 0, 4)
    with pytest.raises(ValueError, match="already"):
        P.apply_lora(m, 2, 4)


def test_token_rows_train_only_their_rows_in_and_out():
    """Guards against new-token rows that change other tokens, miss the tied output head,
    survive lora_disabled, or merge into the wrong rows."""
    model = tiny_model()
    base, _ = model(IDX)
    P.apply_lora(model, r=4, alpha=8)
    P.train_token_rows(model, [5, 60])
    assert torch.equal(model(IDX)[0], base)  # delta = 0 at init
    assert model.lm_head.token_rows is model.tok_emb.token_rows  # tied: one delta
    _, loss = model(IDX, IDX)
    loss.backward()
    delta = model.tok_emb.token_rows.delta
    assert delta.shape == (2, 32) and torch.count_nonzero(delta.grad) > 0
    assert model.tok_emb.weight.grad is None
    with torch.no_grad():
        delta.normal_()
    W = model.tok_emb.token_rows(model.tok_emb.weight)
    assert torch.equal(W[[5, 60]], model.tok_emb.weight[[5, 60]] + delta)
    others = [i for i in range(64) if i not in (5, 60)]
    assert torch.equal(W[others], model.tok_emb.weight[others])
    randomize_lora(model)
    tuned, _ = model(IDX)
    with P.lora_disabled(model):
        assert torch.equal(model(IDX)[0], base)
    P.merge_lora(model)
    torch.testing.assert_close(model(IDX)[0], tuned, rtol=0, atol=1e-5)
    P.unmerge_lora(model)
    torch.testing.assert_close(model(IDX)[0], tuned, rtol=0, atol=1e-5)
    assert "tok_emb.token_rows.delta" in P.lora_state_dict(model)
    assert P.base_param_count(model) == tiny_model().num_params()


def test_adapter_save_load_roundtrip(tmp_path):
    """Guards against an adapter that loads onto the wrong layers or silently drops some."""
    model = P.apply_lora(tiny_model(), r=4, alpha=8, targets=["q_proj", "v_proj", "down"])
    randomize_lora(model)
    ref, _ = model(IDX)
    P.save_adapter(model, tmp_path / "adapter")
    keys = P.read_safetensors(tmp_path / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    assert keys["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"].shape == (4, 32)
    fresh = P.load_adapter(tiny_model(), tmp_path / "adapter")  # wraps the same layers first
    assert torch.equal(fresh(IDX)[0], ref)
    assert P.lora_state_dict(fresh).keys() == P.lora_state_dict(model).keys()
    other = P.apply_lora(tiny_model(), r=4, alpha=8, targets=["k_proj"])
    with pytest.raises(ValueError, match="do not match"):
        P.load_adapter(other, tmp_path / "adapter")
    with pytest.raises(FileNotFoundError, match="adapter_config"):
        P.load_adapter(tiny_model(), tmp_path)


@pytest.mark.parametrize("qlora", [False, True])
def test_adapter_checkpoint_names_its_base(tmp_path, qlora):
    """Guards against a LoRA run's checkpoint that cannot be rebuilt (wrong layers, lost
    QLoRA flag) or that silently loads onto a base model other than its own."""
    base = tmp_path / "ckpt.pt"
    torch.save({"model": tiny_model().state_dict()}, base)
    settings = dict(r=4, alpha=8.0, targets="q_proj,down", qlora=qlora, tokens=[3, 7])
    model = run.apply_adapter(tiny_model(), settings)
    randomize_lora(model)
    ckpt = run.adapter_checkpoint(model, settings, tmp_path)  # a run folder names its ckpt.pt
    assert set(ckpt["model"]) == set(P.lora_state_dict(model)) and len(ckpt["model"]) == 9
    assert ckpt["lora"]["base_sha256"] == hf.file_sha256(base)
    fresh = run.attach_adapter(tiny_model(), ckpt)
    assert torch.equal(fresh(IDX)[0], model(IDX)[0])
    assert isinstance(fresh.blocks[1].mlp.down, P.QLoRALinear if qlora else P.LoRALinear)
    assert P.base_param_count(fresh) == tiny_model().num_params()
    base.write_bytes(base.read_bytes() + b"x")
    with pytest.raises(ValueError, match="changed"):
        run.attach_adapter(tiny_model(), ckpt)


PEFT_ORACLE = """
import torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
idx = torch.load("idx.pt", weights_only=True)
out = {}
for name in ("lora", "rslora"):
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("base"), name).eval()
    with torch.no_grad():
        out[name] = model(idx).logits
        with model.disable_adapter():
            out[name + "/base"] = model(idx).logits
torch.save(out, "out.pt")
"""


@needs_peft
def test_peft_library_loads_our_adapter(tmp_path):
    """Guards against key names, scaling (alpha/r and rsLoRA's alpha/sqrt(r)) or config
    fields that differ from PEFT's: the real library, on the transformers model, must
    reproduce our logits (and with the adapter disabled, the base model's)."""
    ours = {}
    for name in ("lora", "rslora"):
        model = P.apply_lora(tiny_model(), r=4, alpha=8, rslora=name == "rslora")
        randomize_lora(model)
        model.save_pretrained(tmp_path / "base")  # the base weights (a LoRALinear's .weight is W)
        P.save_adapter(model, tmp_path / name, base_model=tmp_path / "base")
        with torch.no_grad():
            ours[name] = model(IDX)[0]
            with P.lora_disabled(model):
                ours[name + "/base"] = model(IDX)[0]
    torch.save(IDX, tmp_path / "idx.pt")
    bench.run_outside_repo(PEFT_ORACLE, tmp_path)
    theirs = torch.load(tmp_path / "out.pt", weights_only=True)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=2e-5)
    assert (ours["lora"] - ours["lora/base"]).abs().max() > 0.01  # the adapter matters
    assert (ours["lora"] - ours["rslora"]).abs().max() > 0.01  # and so does its scale


def test_lora_training_overfits_a_few_sequences():
    """Guards against an adapter that cannot learn (frozen A and B, a lost scale, detached
    update): LoRA alone must memorise four short random sequences.

    subtle: at random init the frozen tied head caps every logit near |h| |e| =
    sqrt(32) * 0.02 sqrt(32) = 0.64, so no adapter could fit; the embedding gets the
    larger scale a trained one has.
    """
    torch.manual_seed(0)
    model = CausalLM(tiny_cfg())
    torch.nn.init.normal_(model.tok_emb.weight, std=0.3)
    P.apply_lora(model, r=8, alpha=16)
    data = torch.randint(0, 64, (4, 17))
    opt = torch.optim.AdamW(P.lora_parameters(model), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(100):
        _, loss = model(data[:, :-1], data[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 < 5 < losses[0]


# -----------------------------------------------------------------------------
# NF4 and the 8-bit code, without bitsandbytes


def test_nf4_code_is_normal_quantiles():
    """Guards against a code that is not QLoRA's: each value is Phi^-1 at an evenly spaced
    probability, divided by Phi^-1(offset); 0 exact; 8 positive, 7 negative values."""
    code, inv, top = P.NF4_CODE, statistics.NormalDist().inv_cdf, statistics.NormalDist().inv_cdf(P.NF4_OFFSET)
    assert code.shape == (16,) and code[7] == 0 and code[0] == -1 and code[15] == 1
    assert (code.diff() > 0).all()
    for k in range(8):  # positive half: probabilities from 0.5 to offset in 8 steps
        p = 0.5 + (P.NF4_OFFSET - 0.5) * (k + 1) / 8
        assert code[8 + k].item() == pytest.approx(inv(p) / top, abs=1e-6)
    for k in range(7):
        p = 0.5 + (P.NF4_OFFSET - 0.5) * (k + 1) / 7
        assert code[6 - k].item() == pytest.approx(-inv(p) / top, abs=1e-6)


def test_nf4_worked_example_and_error_bound():
    """Guards against nibble order, the odd-length pad and the absmax scaling; and bounds
    the error: at most half the widest gap of the code times the block's absmax."""
    packed, state = P.nf4_quantize(torch.tensor([[0.5, -1.0, 0.0]]))
    assert packed.tolist() == [12 << 4 | 0, 7 << 4 | 7]
    W = torch.randn(37, 29, generator=torch.Generator().manual_seed(0))
    for dq in (False, True):
        packed, state = P.nf4_quantize(W, double_quant=dq)
        assert packed.dtype == torch.uint8 and packed.numel() == (W.numel() + 1) // 2
        err = (P.nf4_dequantize(packed, state) - W).reshape(-1)
        c = torch.repeat_interleave(P.blockwise_absmax(W.reshape(-1), 64)[1], 64)[:W.numel()]
        half_gap = P.NF4_CODE.diff().max() / 2
        assert (err.abs() <= half_gap * c * 1.01 + 1e-6).all()
    zero = P.nf4_quantize(torch.zeros(64))
    assert torch.equal(P.nf4_dequantize(*zero), torch.zeros(64))


def test_double_quant_bits():
    """Guards against miscounting the memory: NF4 + DQ must cost 4 + 8/64 + 32/16384 bits."""
    assert 8 * bench.format_bytes(64 * 256 * 100, "nf4+dq") / (64 * 256 * 100) == \
        pytest.approx(4 + 8 / 64 + 32 / (64 * 256), rel=1e-4)
    rows, n_linear, n_rest = bench.memory_table(tiny_cfg())
    model = tiny_model()
    assert n_linear + n_rest == model.num_params()
    assert dict((f, t) for f, _, t in rows)["fp32"] == 4 * model.num_params()


# -----------------------------------------------------------------------------
# bitsandbytes, bit for bit

BNB_ORACLE = """
import torch, bitsandbytes.functional as bnbf
inputs = torch.load("inputs.pt", weights_only=True)
out = {"nf4": bnbf.get_4bit_type("nf4", device="cpu"), "dynamic": bnbf.create_dynamic_map()}
for name, W in inputs.items():
    if name == "absmax":
        q, s = bnbf.quantize_blockwise(W, blocksize=256)
        out[name] = {"q": q, "absmax": s.absmax, "deq": bnbf.dequantize_blockwise(q, s)}
        continue
    for dq in (False, True):
        p, s = bnbf.quantize_4bit(W, quant_type="nf4", compress_statistics=dq)
        r = {"packed": p.reshape(-1), "absmax": s.absmax, "deq": bnbf.dequantize_4bit(p, s)}
        if dq:
            r.update(offset=s.offset, absmax2=s.state2.absmax)
        out[f"{name}/{dq}"] = r
torch.save(out, "out.pt")
"""

# subtle: shapes whose last dimension is a multiple of 16 but not of 64 are left out: the
# CPU kernel of bitsandbytes 0.50 indexes absmax per row there, while it quantizes flat
# blocks of 64, so its own round trip breaks (e.g. (3, 96)).
SHAPES = {"square": (64, 64), "odd": (33, 17), "partial": (5, 129), "vector": (7,),
          "two_dq_blocks": (130, 129), "zero_block": (2, 64)}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture(scope="module")
def bnb(tmp_path_factory):
    """Run bitsandbytes once on every input; return (inputs, its results)."""
    tmp = tmp_path_factory.mktemp("bnb")
    g = torch.Generator().manual_seed(0)
    inputs = {f"{s}/{d}": torch.randn(shape, generator=g).to(dt)
              for s, shape in SHAPES.items() for d, dt in DTYPES.items()}
    for d in DTYPES:
        inputs[f"zero_block/{d}"][0] = 0
    # absmax-like values: many magnitudes, many near 0, where the 8-bit code is finest
    inputs["absmax"] = torch.randn(5000, generator=g) * 10.0 ** torch.randint(-7, 1, (5000,), generator=g)
    torch.save(inputs, tmp / "inputs.pt")
    bench.run_outside_repo(BNB_ORACLE, tmp)
    return inputs, torch.load(tmp / "out.pt", weights_only=True)


@needs_bnb
def test_codes_equal_bitsandbytes(bnb):
    """Guards against a derived NF4 table or 8-bit dynamic code that is off by even 1 ulp."""
    _, theirs = bnb
    assert torch.equal(P.NF4_CODE, theirs["nf4"])
    assert torch.equal(P.DYNAMIC_CODE, theirs["dynamic"])


@needs_bnb
def test_8bit_absmax_quantizer_equals_bitsandbytes(bnb):
    """Guards against the double quantization's 8-bit step rounding differently (the CPU
    kernel's 65536-point grid, not a nearest search)."""
    inputs, theirs = bnb
    q, absmax = P.quantize_blockwise_8bit(inputs["absmax"])
    assert torch.equal(absmax, theirs["absmax"]["absmax"])
    assert torch.equal(q, theirs["absmax"]["q"])
    assert torch.equal(P.dequantize_blockwise_8bit(q, absmax), theirs["absmax"]["deq"])


@needs_bnb
@pytest.mark.parametrize("dq", [False, True], ids=["plain", "double_quant"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_nf4_equals_bitsandbytes(bnb, shape, dtype, dq):
    """Guards against any difference from quantize_4bit/dequantize_4bit: packed bytes, the
    (double-quantized) absmax state and the dequantized weights, bit for bit."""
    inputs, theirs = bnb
    W, ref = inputs[f"{shape}/{dtype}"], theirs[f"{shape}/{dtype}/{dq}"]
    packed, state = P.nf4_quantize(W, double_quant=dq)
    assert torch.equal(packed, ref["packed"])
    assert torch.equal(state["absmax"], ref["absmax"])
    if dq:
        assert torch.equal(state["offset"], ref["offset"]) and torch.equal(state["absmax2"], ref["absmax2"])
    W4 = P.nf4_dequantize(packed, state)
    assert W4.dtype == W.dtype and W4.shape == W.shape
    assert torch.equal(W4, ref["deq"].reshape(W.shape))  # bnb returns a vector as (1, n)


# -----------------------------------------------------------------------------
# QLoRA


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qlora_linear_is_dequant_plus_lora(dtype):
    """Guards against a QLoRA layer that uses the full-precision weight, dequantizes in
    another dtype or drops the bias; and against gradients reaching the 4-bit weight."""
    torch.manual_seed(0)
    base = torch.nn.Linear(96, 40).to(dtype)
    q = P.QLoRALinear(base, r=4, alpha=8)
    randomize_lora(q)
    x = torch.randn(2, 3, 96).to(dtype)
    W = P.nf4_dequantize(q.weight_packed, q.quant_state(), dtype)  # (40, 96)
    ref = x @ W.T + base.bias + (x @ q.lora_A.T @ q.lora_B.T) * 2
    y = q(x)
    assert y.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: rounding order differs
    torch.testing.assert_close(y, ref, rtol=0, atol=tol)
    assert not torch.equal(W, base.weight.detach())  # it is the 4-bit weight
    assert q.absmax.dtype == torch.uint8  # double quantization by default
    xg = x.clone().requires_grad_(True)
    g = torch.randn(y.shape).to(dtype)
    (q(xg) * g).sum().backward()  # recomputed W in backward: dL/dx = g (W + s B A)
    torch.testing.assert_close(xg.grad, g @ (W + 2 * q.lora_B @ q.lora_A), rtol=0, atol=tol)
    assert q.lora_B.grad is not None and all(not b.requires_grad for b in q.buffers())
    assert base.weight.grad is None and base.bias.grad is None


def test_apply_qlora_model():
    """Guards against apply_qlora leaving layers in full precision or training the base."""
    model = tiny_model()
    base, _ = model(IDX)
    P.apply_qlora(model, r=4, alpha=8)
    assert all(isinstance(m, P.QLoRALinear) for _, m in P.lora_modules(model))
    assert len(P.lora_modules(model)) == 14
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {f"{n}.{k}" for n, _ in P.lora_modules(model) for k in ("lora_A", "lora_B")}
    out, _ = model(IDX)
    assert 0 < (out - base).abs().max() < 0.5  # only the 4-bit rounding differs at init
    with pytest.raises(ValueError, match="4-bit"):
        P.merge_lora(model)


# -----------------------------------------------------------------------------
# sft.py with LoRA and QLoRA


@pytest.fixture(scope="module")
def lora_base(base, tmp_path_factory):
    """Lesson 10's tiny base run, its embedding scaled to a trained model's size (see
    test_lora_training_overfits_a_few_sequences: at init the frozen head caps the logits)."""
    root = tmp_path_factory.mktemp("lora")
    ckpt = load_checkpoint(base[0] / "base" / "ckpt.pt")
    ckpt["model"]["tok_emb.weight"] *= 15
    save_checkpoint(root / "base" / "ckpt.pt", ckpt)
    shutil.copy(base[0] / "facts.jsonl", root / "facts.jsonl")
    return root


@pytest.mark.parametrize("qlora", [False, True])
def test_lora_sft_overfits_a_handful_of_conversations(lora_base, tmp_path, qlora):
    """Guards the whole LoRA path through sft.py: adapter, chat-token rows, optimizer, and a
    checkpoint that holds the adapter alone yet loads back (load_run) as the tuned model."""
    out = tmp_path / "out"
    result = sft.train(sft_config(lora_base, out, lora_rank=8, qlora=qlora))
    assert result["eval"]["story"]["accuracy"] == 1.0
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["lora"]["base_sha256"] == hf.file_sha256(lora_base / "base" / "ckpt.pt")
    assert all(".lora_" in k or ".token_rows." in k for k in ckpt["model"])
    model, tok, _ = sft.load_run(out)
    assert chat_exact_match(model, tok, FACTS)["replies"] == ["the park", "Mia", "red", "5"]
    assert isinstance(model.blocks[0].mlp.up, P.QLoRALinear if qlora else P.LoRALinear)
    with P.lora_disabled(model):  # the base model underneath never learned the facts
        assert chat_exact_match(model, tok, FACTS)["accuracy"] == 0.0


def test_lora_sft_resume_is_bit_identical(lora_base, tmp_path, monkeypatch, ctrl_c_at):
    """Guards resuming a LoRA run: the base rebuilt from its checkpoint, the adapter and
    Adam's moments restored -- 12 straight steps == 6, Ctrl-C, --resume, 6."""
    cfg = lambda out, **kw: sft_config(lora_base, tmp_path / out, max_iters=12, eval_interval=5,
                                       eval_n=0, lora_rank=4, **kw)
    sft.train(cfg("straight"))
    ctrl_c_at(sft, 6)
    assert sft.train(cfg("split"))["step"] == 6
    monkeypatch.undo()
    assert sft.train(cfg("split", resume=True))["step"] == 12
    a = load_checkpoint(tmp_path / "straight" / "ckpt.pt")["model"]
    b = load_checkpoint(tmp_path / "split" / "ckpt.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_qlora_needs_a_rank(lora_base, tmp_path):
    with pytest.raises(ValueError, match="lora_rank"):
        sft.train(sft_config(lora_base, tmp_path / "out", qlora=True))


# -----------------------------------------------------------------------------
# align.py and rl.py with LoRA: the adapters switched off are the reference


def test_dpo_with_lora_uses_the_adapters_off_as_its_reference(lora_base, tmp_path, monkeypatch):
    """Guards reference="lora": only the adapter trains, the reference the loss sees is
    exactly the init model (a frozen copy gives the same log-probs after training), the
    checkpoint holds the adapter and the init's hash, and a resumed run equals a straight one."""
    import align

    wrong = ["the lake", "Tom", "blue", "6"]
    pairs = lora_base / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": c[:-1], "chosen": c[-1:], "rejected": [{**c[-1], "content": w}]}) + "\n"
                             for c, w in zip(FACTS, wrong)))
    cfg = lambda out, **kw: {**align.DEFAULTS, "init": str(lora_base / "base"), "out_dir": str(tmp_path / out),
                             "data": str(pairs), "val_data": str(pairs), "eval_story": str(lora_base / "facts.jsonl"),
                             "eval_examples": 4, "eval_pairs": 4, "batch_size": 4, "lr": 1e-2, "max_iters": 8,
                             "log_interval": 4, "eval_interval": 4, "lora_rank": 4, "reference": "lora", **kw}
    result = align.train(cfg("straight"), log=lambda *a: None)
    assert result["after"]["pref_acc"] == 1.0  # the held-out pairs are the training pairs here
    ckpt = load_checkpoint(tmp_path / "straight" / "ckpt.pt")
    assert all(".lora_" in k for k in ckpt["model"])
    assert ckpt["lora"]["base_sha256"] == hf.file_sha256(lora_base / "base" / "ckpt.pt")
    policy, tok, _ = sft.load_run(tmp_path / "straight")
    init = sft.load_run(lora_base / "base")[0]
    ids, mask = align.collate_pairs(align.read_preferences(pairs, tok, 48, log=lambda *a: None))
    ref = align.sequence_logprobs(init, ids, mask)[0]
    assert torch.allclose(align.sequence_logprobs(align.AdaptersOff(policy), ids, mask)[0], ref, atol=1e-5)
    assert not torch.allclose(align.sequence_logprobs(policy, ids, mask)[0], ref, atol=1e-2)  # it learned
    with pytest.raises(ValueError, match="lora_rank"):
        align.train(cfg("bad", lora_rank=0), log=lambda *a: None)
    with pytest.raises(ValueError, match="reward model trains every weight"):  # its loader wants a plain model
        align.train(cfg("rm", method="reward", reference="copy"), log=lambda *a: None)
    calls = []
    real = align.dpo_step

    def interrupt(*a):  # Ctrl-C at the 6th call: the evaluation before, steps 1-4, the one at step 4
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(align, "dpo_step", interrupt)
    assert align.train(cfg("split"), log=lambda *a: None)["step"] < 8
    monkeypatch.undo()
    align.train(cfg("split", resume=True), log=lambda *a: None)
    b = load_checkpoint(tmp_path / "split" / "ckpt.pt")["model"]
    assert ckpt["model"].keys() == b.keys() and all(torch.equal(ckpt["model"][k], b[k]) for k in b)


def test_adapters_off_is_the_base_in_eval_mode():
    """Guards the LoRA reference: with dropout on and the policy training, AdaptersOff gives
    the base model's eval-mode logits every time, and leaves the policy in training mode."""
    import align

    model = tiny_model(dropout=0.5)
    base = tiny_model(dropout=0.5)
    P.apply_lora(model, 4, 8)
    randomize_lora(model)
    model.train()
    ref = align.AdaptersOff(model)
    a, b = ref(IDX)[0], ref(IDX)[0]
    assert torch.equal(a, b) and torch.allclose(a, base(IDX)[0], atol=1e-6)
    assert model.training and not torch.allclose(model.eval()(IDX)[0], a, atol=1e-3)


def test_grpo_and_ppo_with_lora_train_only_the_adapter(tiny_run, tmp_path):
    """Guards RL with lora_rank: both loops run with the adapters-off reference, the first
    iteration's KL to it is exactly 0 (B starts at 0, so the policy *is* its reference), and
    the checkpoint holds the adapter alone. (That the reference stays the init model while the
    adapter moves is test_dpo_with_lora_uses_the_adapters_off_as_its_reference's job.)"""
    import rl

    root, _ = tiny_run
    for method in ("grpo", "ppo"):
        out = tmp_path / method
        cfg = rl_cfg(root, out, method=method, prompts=str(root / "eval.jsonl"), task="story", max_iters=2,
                     log_interval=1, prompts_per_iter=2, samples_per_prompt=4, max_new_tokens=4,
                     minibatch_size=4, lora_rank=4, reference="lora")
        assert rl.train(cfg, log=lambda *a: None)["step"] == 2
        assert [json.loads(line) for line in open(out / "log.jsonl")][0]["kl"] == 0.0
        assert all(".lora_" in k for k in load_checkpoint(out / "ckpt.pt")["model"])


def test_docstring_examples():
    """The >>> examples lesson 14 wrote run as printed."""
    run_doctests(P.apply_lora, P.nf4_code, P.dynamic_code, P.blockwise_absmax, P.nf4_quantize,
                 bench.format_bytes)
#< L14
