#> L05 hf
"""
hf.py -- Hugging Face formats: read and write the files real models ship in.

    from hf import load_pretrained, save_pretrained
    model = load_pretrained("qwen3-folder")        # config.json + *.safetensors
    save_pretrained(model, "out/export")           # transformers can load it back

A downloaded model is a folder: config.json (the shape), one or more
.safetensors files (the weights, by their library's parameter names),
tokenizer.json and, for a chat model, its chat template. This file reads and
writes those, and nothing else: the safetensors format by hand (lesson 05), the
map between their config keys and parameter names and ours (GPT-2, Llama,
Qwen3), and (lesson 10) a model folder used as a run folder: tokenizer.json's
byte-level BPE read into our tokenizer (byte_to_unicode, HFTokenizer.from_hf),
and the real models' chat templates, ChatML/Qwen3 and Llama 3 (CHAT_FORMATS),
which HFTokenizer renders in place of ours. model.py's
CausalLM.from_pretrained / save_pretrained are thin calls into it; tokenizer.py
never imports it.
"""

import json
import math
import os
#> L10 hf-tokenizer
import unicodedata
#< L10
from pathlib import Path

import torch

from model import CausalLM, ModelConfig, rope_cos_sin, sinusoidal_positions
#> L10 hf-tokenizer
from tokenizer import CHAT_TOKENS, GPT2_SPLIT_PATTERN, BPETokenizer, check_message, read_json
#< L10


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


# -----------------------------------------------------------------------------
# A model folder, both ways: their tensors in, ours out


def load_pretrained(path, dtype=torch.float32):
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
        model = CausalLM(cfg)
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
    rebuild_buffers(model)
    return model.eval()


def rebuild_buffers(model):
    """Recompute the derived tables (RoPE, sinusoid), empty after a meta-device init, and
    re-tie the head: load_state_dict(assign=True) gave it a Parameter of its own."""
    cfg = model.cfg
    if cfg.pos_emb == "rope":
        model.rope_cos, model.rope_sin = rope_cos_sin(cfg.block_size, cfg.head_dim, cfg.rope_theta)
    elif cfg.pos_emb == "sinusoidal":
        model.pos_table = sinusoidal_positions(cfg.block_size, cfg.n_embd)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight


def save_pretrained(model, path, model_type=None):
    """Write config.json + model.safetensors that transformers can load."""
    cfg = model.cfg
    model_type = model_type or ("gpt2" if cfg.pos_emb == "learned" else "qwen3" if cfg.qk_norm else "llama")
    hf = config_to_hf(cfg, model_type)
    tensors = {}
    # The loading map run backwards: stack ours into theirs, transpose for GPT-2's Conv1D.
    for theirs, ours, kind in hf_weight_map(cfg, model_type):
        t = torch.cat([model.get_parameter(name).detach() for name in ours], dim=0)
        tensors[theirs] = t.t().contiguous() if kind == "conv1d" and t.dim() == 2 else t
    Path(path).mkdir(parents=True, exist_ok=True)
    write_safetensors(Path(path) / "model.safetensors", tensors)
    (Path(path) / "config.json").write_text(json.dumps(hf, indent=2))
#< L05
#> L10 hf-run


# -----------------------------------------------------------------------------
# tokenizer.json: a Hugging Face byte-level BPE, read into our tokenizer


def byte_to_unicode():
    """The printable character GPT-2's files use for each byte (Radford et al. 2019).

    Bytes that are visible Latin-1 characters stand for themselves; the other 68
    (controls, space, soft hyphen...) are moved to 256, 257, ... in byte order,
    so every token prints without whitespace or control codes: " the" is "Ġthe"
    because byte 32 is the 33rd moved byte, chr(256 + 32).
    >>> byte_to_unicode()[ord(" ")], byte_to_unicode()[ord("A")]
    ('Ġ', 'A')
    """
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    moved = [b for b in range(256) if b not in visible]
    return {**{b: chr(b) for b in visible}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


def _hf_split_pattern(pre, file):
    """The chunking regex of a tokenizer.json pre-tokenizer: a Split step's regex
    (Llama 3, Qwen) or ByteLevel's built-in GPT-2 regex (use_regex true)."""
    steps = pre.get("pretokenizers", [pre])
    for step in steps:
        if step.get("type") == "Split":
            if step.get("behavior") != "Isolated" or step.get("invert"):
                raise ValueError(f"{file}: only Split with behavior Isolated is supported")
            return step["pattern"]["Regex"]
        if step.get("type") == "ByteLevel" and step.get("use_regex", True):
            if step.get("add_prefix_space"):
                raise ValueError(f"{file}: ByteLevel add_prefix_space=true is not supported")
            return GPT2_SPLIT_PATTERN
    raise ValueError(f"{file}: no split regex found in the pre-tokenizer")


# -----------------------------------------------------------------------------
# Real models' templates: the same conversation, written the way Qwen3 and Llama 3 were tuned
#
# A chat model only answers well in the exact layout it was fine-tuned on. Each
# format below is the text around one turn; pieces written <like-this> are
# special tokens (single ids), the rest is text, "{role}" the turn's role.
#   ChatML (Qwen):  <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n
#   Llama 3:        <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>...
# Qwen3 adds a reasoning block, <think>\n...\n</think>\n\n, before a reply. Its
# template writes an empty one before the last reply of a conversation, and, with
# thinking switched off (enable_thinking=False), into the prompt: the model then
# answers at once instead of reasoning first.
CHAT_FORMATS = {
    "chatml": {"begin": [], "start": ["<|im_start|>", "{role}\n"], "end": ["<|im_end|>", "\n"]},
    "qwen3": {"begin": [], "start": ["<|im_start|>", "{role}\n"], "end": ["<|im_end|>", "\n"],
              "think": ["<think>", "\n\n", "</think>", "\n\n"]},
    "llama3": {"begin": ["<|begin_of_text|>"], "end": ["<|eot_id|>"], "strip": True,  # content trimmed
               "start": ["<|start_header_id|>", "{role}", "<|end_header_id|>", "\n\n"]},
}
is_special = lambda piece: piece.startswith("<") and piece.endswith(">")  # in CHAT_FORMATS' lists


def format_tokens(name):
    """The special tokens of CHAT_FORMATS[name], in the order they appear in it."""
    fmt = CHAT_FORMATS[name]
    return [p for key in ("begin", "start", "end", "think") for p in fmt.get(key, []) if is_special(p)]


def hf_chat_format(folder, tok):
    """The chat format of a Hugging Face model folder, or None (a base model: plain text).

    Read from the template in tokenizer_config.json (or chat_template.jinja, where
    newer transformers versions save it) by the tokens it writes, else from
    config.json's model_type; None too when the tokenizer lacks the format's tokens.
    """
    folder = Path(folder)
    template = hf_chat_template(folder)
    kind = json.loads((folder / "config.json").read_text()).get("model_type") \
        if (folder / "config.json").exists() else None
    if "<|start_header_id|>" in template or not template and kind == "llama":
        name = "llama3"
    elif "<|im_start|>" in template:
        name = "qwen3" if "<think>" in template else "chatml"
    else:
        name = {"qwen3": "qwen3", "qwen2": "chatml"}.get(kind)
    if name is None or not set(format_tokens(name)) <= set(tok.special_tokens):
        return None
    return {"name": name, "thinking": False}  # thinking off: quick answers (chat.py /think toggles)


def hf_chat_template(folder):
    """The Jinja chat template a Hugging Face folder ships ("" if none)."""
    folder = Path(folder)
    if (folder / "chat_template.jinja").exists():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    template = json.loads(config.read_text(encoding="utf-8")).get("chat_template") if config.exists() else None
    if isinstance(template, list):  # several named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), "")
    return template or ""


# -----------------------------------------------------------------------------
# The tokenizer of a real model: their vocabulary, their chat template


class HFTokenizer(BPETokenizer):
    """Our BPETokenizer read from a Hugging Face tokenizer.json (from_hf), speaking
    its model's chat template: render_conversation writes Qwen3's ChatML or Llama
    3's headers (CHAT_FORMATS) instead of ours, and the state a checkpoint stores
    names the format, so every run made from the model keeps its layout. Without
    a template (GPT-2, a base model) it is our tokenizer with their vocabulary.

    tokenizer.py never imports this file: the stages ask any tokenizer for its
    template_tokens and template_end, which this class overrides, and
    run.load_tokenizer rebuilds it from a checkpoint's state.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.chat_format = None  # None: our template; {"name": "qwen3", ...}: a real model's (CHAT_FORMATS)

    @classmethod
    def from_hf(cls, path):
        """Read a Hugging Face tokenizer.json of the byte-level BPE kind (GPT-2,
        Llama 3, Qwen2/3) into our tokenizer: the same ids as the `tokenizers`
        library for any text, special tokens included.

        Such a file stores tokens as text: each byte is shown as a printable
        character (byte_to_unicode), so vocab maps e.g. "Ġthe" (" the") to an id
        and merges lists pairs in priority order. The split regex sits in the
        pre-tokenizer; added_tokens carry the specials with their ids.
        """
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        data = read_json(file)
        model, pre = data.get("model") or {}, data.get("pre_tokenizer") or {}
        if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(pre):
            raise ValueError(f"{file}: only byte-level BPE tokenizers (GPT-2, Llama 3, Qwen) are "
                             f"supported; this is {model.get('type')} with pre-tokenizer "
                             f"{pre.get('type')} (SentencePiece/Unigram and WordPiece are not)")
        if (data.get("normalizer") or {}).get("type") not in (None, "NFC"):
            raise ValueError(f"{file}: normalizer {data['normalizer']['type']} is not supported (NFC is)")
        tok = cls(_hf_split_pattern(pre, file))
        char = byte_to_unicode()
        vocab = model["vocab"]  # token text -> id
        try:
            tok.byte_ids = [vocab[char[b]] for b in range(256)]
        except KeyError as e:
            raise ValueError(f"{file}: byte {e.args[0]!r} has no token; a byte-level BPE must "
                             "cover all 256 bytes") from None
        for pair in model["merges"]:
            a, b = pair.split(" ") if isinstance(pair, str) else pair  # old and new file formats
            tok.merges[vocab[a], vocab[b]] = vocab[a + b]
        # subtle: we replay merges by the new token's id (as tiktoken does), the file by the
        # merge's position in the list; they agree exactly when ids grow along the list.
        if list(tok.merges.values()) != sorted(tok.merges.values()):
            raise ValueError(f"{file}: merge priorities do not follow token ids; not supported")
        tok.special_tokens = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
        tok.special_names = sorted(tok.special_tokens, key=tok.special_tokens.get)
        tok.nfc = (data.get("normalizer") or {}).get("type") == "NFC"
        tok.ignore_merges = bool(model.get("ignore_merges"))
        tok.chat_format = hf_chat_format(file.parent, tok)  # Qwen3's ChatML, Llama 3's headers, or None
        tok._build()
        return tok

    # ---- the model's chat template -----------------------------------------

    def render_conversation(self, messages, for_completion=False):
        """A conversation in the model's own format: (ids, mask), ids equal to
        transformers' apply_chat_template(messages, add_generation_prompt=for_completion)
        on that model's template, mask 1 on each reply and the end token after it.

        The template is written as text first, then tokenized the way transformers
        does: special tokens cut the text, each stretch between them is encoded as a
        whole. subtle: encoding the pieces one by one could split differently where
        a reply starts ("\\n\\n" of the header, then "\\nHi", may merge across), so a
        token's mask is 1 when any of its bytes comes from the reply.

        Without a format of its own (a base model), this is our template, BPETokenizer's.
        """
        if not self.chat_format:  # no template in the folder: ours, if the vocabulary has its tokens
            return super().render_conversation(messages, for_completion)
        fmt = CHAT_FORMATS[self.chat_format["name"]]
        # Pieces (text, learn, special): the template's own, then each message's content.
        struct = lambda parts, role="": [(p.format(role=role), 0, is_special(p)) for p in parts]
        pieces, last = struct(fmt["begin"]), len(messages) - 1
        for i in range(len(messages)):
            role, content = check_message(messages, i, for_completion)
            try:  # content may not contain special-token text: it would become structure
                self.encode(content)
            except ValueError as e:
                raise ValueError(f"message {i} ({role}): {e}") from None
            learn = int(role == "assistant")
            pieces += struct(fmt["start"], role)
            if learn and i == last and "think" in fmt:  # Qwen3: the last reply follows an empty thought
                pieces += struct(fmt["think"])
            content = content.strip() if fmt.get("strip") else content
            # The reply and its end token are learned; the newline after the end is not (we stop there).
            pieces += [(content, learn, False), (fmt["end"][0], learn, True)] + struct(fmt["end"][1:])
        if for_completion:
            pieces += struct(fmt["start"], "assistant")
            if "think" in fmt and not self.chat_format.get("thinking"):  # enable_thinking=False
                pieces += struct(fmt["think"])
        ids, mask, run = [], [], []  # run: the text pieces since the last special token
        for text, learn, special in pieces + [(None, 0, True)]:  # None: flush the last run
            if not special:
                run.append((unicodedata.normalize("NFC", text) if self.nfc else text, learn))
                continue
            # One bit per byte: does it belong to a learned piece? A token's mask is any of its bits.
            flags = b"".join(bytes([learn]) * len(t.encode("utf-8")) for t, learn in run)
            at = 0
            for t in self.encode_ordinary("".join(t for t, _ in run)):
                ids.append(t)
                mask.append(int(any(flags[at:at + len(self.vocab[t])])))
                at += len(self.vocab[t])
            run = []
            if text is not None:
                ids.append(self.special_tokens[text])
                mask.append(learn)
        return ids, mask

    @property
    def template_tokens(self):
        """The special tokens our render writes (BPETokenizer's are tokenizer.CHAT_TOKENS)."""
        return format_tokens(self.chat_format["name"]) if self.chat_format else CHAT_TOKENS

    @property
    def template_end(self):
        """The token that ends a reply : <|im_end|> for
        ChatML and Qwen3, <|eot_id|> for Llama 3."""
        return CHAT_FORMATS[self.chat_format["name"]]["end"][0] if self.chat_format else "<|assistant_end|>"

    def state(self):
        state = super().state()
        if self.chat_format:  # a real model's template travels with every run made from it
            state["chat_format"] = self.chat_format
        return state

    @classmethod
    def from_state(cls, data, where="tokenizer state"):
        tok = super().from_state(data, where)
        tok.chat_format = data.get("chat_format")
        return tok


# -----------------------------------------------------------------------------
# A model folder as a run


def is_hf_folder(path):
    """A Hugging Face model folder (config.json + weights), not one of our run folders."""
    path = Path(path)
    return path.is_dir() and (path / "config.json").exists() and not (path / "ckpt.pt").exists()


#> L14 lora-base
def file_sha256(path):
    """SHA-256 of a checkpoint file, or of a Hugging Face folder's config and weights.

    A LoRA run stores only B A, a change to one particular W: on any other base the same
    adapter computes something else, silently. The digest lets load_run refuse that."""
    import hashlib

    path = Path(path)
    # A folder: hash each defining file's name and digest, sorted, so the result does not
    # depend on the order the file system lists them in, nor on tokenizer or README files.
    if path.is_dir():
        digest = hashlib.sha256()
        for file in [path / "config.json", *sorted(path.glob("*.safetensors"))]:
            digest.update(file.name.encode() + bytes.fromhex(file_sha256(file)))
        return digest.hexdigest()
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def checkpoint_file(path):
    """What a LoRA run's base is: a ckpt.pt, or a Hugging Face folder as a whole."""
    path = Path(path)
    return path / "ckpt.pt" if path.is_dir() and not is_hf_folder(path) else path
#< L14


def load_hf_run(path, device="cpu", dtype=None):
    """(model, tokenizer, checkpoint-like dict) from a Hugging Face folder: config.json,
    *.safetensors, tokenizer.json and, for a chat model, its chat template.

    The dict holds what our checkpoints hold for the stages that read them: the
    model's config, the tokenizer's state (its chat format included, so a model
    fine-tuned from here chats in Qwen3's or Llama 3's layout after reloading),
    and "chat" when the folder ships a template (chat.py then opens a chat).
    """
    path = Path(path)
    if not (path / "tokenizer.json").exists():
        raise FileNotFoundError(f"{path} has no tokenizer.json: download the model's whole folder "
                                "(weights, config.json, tokenizer.json, tokenizer_config.json)")
    model = load_pretrained(path, dtype or torch.float32).to(device)
    tok = HFTokenizer.from_hf(path)
    if tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"{path}: tokenizer.json has {tok.vocab_size} tokens, the model only "
                         f"{model.cfg.vocab_size} embedding rows; the files are from different models")
    chat = tok.chat_format is not None and bool(hf_chat_template(path))
    return model, tok, {"model_config": dict(model.cfg.__dict__), "tokenizer": tok.state(), "chat": chat}
#< L10
