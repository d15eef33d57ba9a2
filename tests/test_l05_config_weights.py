#> L05 tests
"""Lesson 05: configs, counting, and real checkpoints against Hugging Face transformers."""

import json

import pytest
import torch

from model import CausalLM, ModelConfig, PRESETS, preset
from hf import read_safetensors, write_safetensors


@pytest.mark.parametrize("kw, message", [
    (dict(n_embd=30, n_head=4), "n_embd=30 is not divisible by n_head=4"),
    (dict(n_head=4, n_kv_head=3), "n_head=4 is not divisible by n_kv_head=3"),
    (dict(pos_emb="alibi"), "unknown pos_emb='alibi'; choose one of"),
    (dict(norm="batchnorm"), "unknown norm='batchnorm'"),
    (dict(mlp="relu"), "unknown mlp='relu'"),
])
def test_config_validation_names_the_problem(kw, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kw)


def test_parameter_counts_of_real_models_on_meta():
    """Exact published sizes: GPT-2 124M and Qwen3-0.6B (tied embeddings)."""
    with torch.device("meta"):
        gpt2, qwen = CausalLM(preset("gpt2")), CausalLM(preset("qwen3-0.6b"))
    assert gpt2.num_params() == 124_439_808
    assert qwen.num_params() == 596_049_920
    assert gpt2.num_params(embeddings=False) == 124_439_808 - 50257 * 768 - 1024 * 768
    assert set(PRESETS) == {"tiny", "small", "gpt2", "qwen3-0.6b"}


def test_parameter_count_and_flops_by_hand():
    """tiny: V=2048, C=128, L=4, SwiGLU width 352, RMSNorm, tied head."""
    model = CausalLM(preset("tiny"))
    per_layer = 4 * 128 * 128 + 3 * 128 * 352 + 2 * 128
    assert model.num_params() == 2048 * 128 + 4 * per_layer + 128
    matmul = 4 * per_layer + 128 + 2048 * 128  # the tied head is a matmul again
    assert model.flops_per_token(T=256) == 6 * matmul + 12 * 4 * 4 * 32 * 256
    assert model.mfu(tokens_per_second=1e4, peak_flops=1e12) == pytest.approx(model.flops_per_token() * 1e-8)


def test_init_scales_residual_projections():
    model = CausalLM(ModelConfig(n_layer=8, n_embd=128, n_head=4))
    assert model.lm_head.weight is model.tok_emb.weight
    assert abs(model.blocks[0].attn.q_proj.weight.std().item() - 0.02) < 2e-3
    assert abs(model.blocks[0].attn.o_proj.weight.std().item() - 0.02 / 4) < 1e-3  # 1/sqrt(2*8)


# ---- safetensors and transformers parity ------------------------------------


def test_safetensors_roundtrip_and_corruption(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64),
               "c": torch.randn(2, 2).to(torch.bfloat16)}
    write_safetensors(tmp_path / "x.safetensors", tensors)
    back = read_safetensors(tmp_path / "x.safetensors")
    assert back.keys() == tensors.keys()
    for k in tensors:
        assert back[k].dtype == tensors[k].dtype and torch.equal(back[k], tensors[k])
    raw = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "bad.safetensors").write_bytes((10 ** 9).to_bytes(8, "little") + raw[8:])
    with pytest.raises(ValueError, match="corrupt safetensors header"):
        read_safetensors(tmp_path / "bad.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(raw[:-8])
    with pytest.raises(ValueError, match="tensor 'c' has a bad dtype, shape or offsets"):
        read_safetensors(tmp_path / "cut.safetensors")


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """Small random GPT-2, Llama and Qwen3 models built offline by transformers, with
    weights scaled up so that any difference in a formula shows in the logits."""
    tf = pytest.importorskip("transformers", reason="pip install -r requirements-dev.txt")
    tf.logging.set_verbosity_error()
    configs = {
        "gpt2": tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=128,
                              bos_token_id=0, eos_token_id=0),
        "llama": tf.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, intermediate_size=96, vocab_size=128,
                                max_position_embeddings=64, rope_theta=500.0),
        # subtle: Qwen3Config defaults head_dim to 128 whatever hidden_size, and is untied
        "qwen3": tf.Qwen3Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=32, intermediate_size=96,
                                vocab_size=128, max_position_embeddings=64, tie_word_embeddings=True),
    }
    out = {}
    for name, cfg in configs.items():
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(cfg).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.2)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        out[name] = (model, path)
    return tf, out


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen3"])
def test_from_pretrained_matches_transformers(hf_models, name):
    """Same logits (1e-4) and the same 30-token greedy continuation as transformers."""
    tf, models = hf_models
    ref, path = models[name]
    ours = CausalLM.from_pretrained(path)
    assert ours.num_params() == sum(p.numel() for p in ref.parameters())
    idx = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], ref(idx).logits, atol=1e-4, rtol=1e-4)
        theirs = ref.generate(idx[:1, :8], max_new_tokens=30, do_sample=False, min_new_tokens=30,
                              pad_token_id=0)
    assert torch.equal(ours.generate(idx[:1, :8], 30, temperature=0), theirs)


@pytest.mark.parametrize("name", ["gpt2", "qwen3"])
def test_save_pretrained_loads_back_into_transformers(hf_models, name, tmp_path):
    tf, models = hf_models
    ours = CausalLM.from_pretrained(models[name][1])
    ours.save_pretrained(tmp_path)
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(back(idx).logits, ours(idx)[0], atol=1e-4, rtol=1e-4)


def test_sharded_checkpoints_and_missing_tensors(hf_models, tmp_path):
    """An index.json splits tensors over files; a missing tensor is named in the error."""
    _, models = hf_models
    src = models["llama"][1]
    tensors = read_safetensors(src / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    write_safetensors(tmp_path / "a.safetensors", {k: tensors[k] for k in names[:half]})
    write_safetensors(tmp_path / "b.safetensors", {k: tensors[k] for k in names[half + 1:]})
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    weight_map = {k: "a.safetensors" if i < half else "b.safetensors" for i, k in enumerate(names)}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(KeyError, match=f"tensor '{names[half]}' is missing"):
        CausalLM.from_pretrained(tmp_path)
    write_safetensors(tmp_path / "b.safetensors", {k: tensors[k] for k in names[half:]})
    ref = CausalLM.from_pretrained(src)
    idx = torch.randint(0, 128, (1, 10))
    torch.testing.assert_close(CausalLM.from_pretrained(tmp_path)(idx)[0], ref(idx)[0])
#< L05
