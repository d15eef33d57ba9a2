#> L10 tests
"""Issue 17, lesson 10's part: a Hugging Face model folder (tiny Qwen3 and Llama built
with transformers, a tokenizer.json trained offline, a chat template) is a run that
load_run, chat.py and eval.py open; hf.py reads tokenizer.json to the `tokenizers`
library's ids; Qwen3's and Llama 3's templates equal transformers' apply_chat_template
token for token; generation equals transformers' generate."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eval as E
import sft
from hf import HFTokenizer, byte_to_unicode
from run import chat_reply, load_run, load_tokenizer
from tokenizer import CHAT_TOKENS, GPT4_SPLIT_PATTERN, BPETokenizer

from conftest import run_doctests

tf = pytest.importorskip("transformers", reason="transformers is test-only: pip install -r requirements-dev.txt")
ROOT = Path(__file__).resolve().parents[1]

HF_TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog's 3 boxes; it's 12,345.67 km.",
    "Ünïcödé: naïve café, Straße, ĳ, ﬁ, e\u0301 (combining), Ελληνικά, русский, עברית, العربية",
    "中文分词很难。日本語のテキスト、한국어 텍스트 🎉🤖👩‍👩‍👧 ☃️ 🇫🇷",
    "def f(x):\n\treturn {'a': [x ** 2, x // 3]}  # comment\n\n\n    if x != 0:\r\n        pass   ",
    "   leading and    inner   spaces,\t\ttabs\n \n  and trailing whitespace   \n\n",
]


def hf_tokenizer(tmp_path, name, split=None, nfc=False, ignore_merges=False,
                 specials=("<|endoftext|>", "<|im_start|>")):
    """Train a byte-level BPE offline with the `tokenizers` library itself and save its
    tokenizer.json: GPT-2 style (ByteLevel's own regex) or with a Split regex (Qwen2)."""
    tk = pytest.importorskip("tokenizers", reason="tokenizers comes with transformers (requirements-dev.txt)")
    tok = tk.Tokenizer(tk.models.BPE(ignore_merges=ignore_merges))
    byte_level = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None)
    tok.pre_tokenizer = byte_level if split is None else tk.pre_tokenizers.Sequence(
        [tk.pre_tokenizers.Split(tk.Regex(split), behavior="isolated"), byte_level])
    tok.decoder = tk.decoders.ByteLevel()  # printable characters back to bytes, as real files do
    if nfc:
        tok.normalizer = tk.normalizers.NFC()
    trainer = tk.trainers.BpeTrainer(vocab_size=600, special_tokens=list(specials),
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(HF_TEXTS * 20, trainer)
    path = tmp_path / f"{name}.json"
    tok.save(str(path))
    if ignore_merges:  # a token that its own merges cannot build: "QWZ" from (QW, Z), while
        data = json.loads(path.read_text())  # the earlier merge (W, Z) takes the W first
        n, vocab = len(data["model"]["vocab"]), data["model"]["vocab"]
        vocab.update({"WZ": n, "QW": n + 1, "QWZ": n + 2})
        data["model"]["merges"] += [["W", "Z"], ["Q", "W"], ["QW", "Z"]]
        path.write_text(json.dumps(data))
    return tk.Tokenizer.from_file(str(path)), path


QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


# Short templates of our own, in transformers' Jinja, that write exactly the documented
# formats. Qwen3: ChatML; an empty <think> block before the conversation's last reply and,
# with enable_thinking=False, in the generation prompt. Llama 3: headers, content trimmed.
QWEN3_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' and loop.last %}<think>\n\n</think>\n\n{% endif %}"
    "{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
LLAMA3_TEMPLATE = (
    "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
    "{{ m.content | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
KINDS = {
    "qwen3": dict(split=QWEN2_SPLIT, nfc=True, template=QWEN3_TEMPLATE,
                  specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")),
    "llama": dict(split=GPT4_SPLIT_PATTERN, ignore_merges=True, template=LLAMA3_TEMPLATE,
                  specials=("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                            "<|end_header_id|>", "<|eot_id|>")),
}


def make_hf_folder(root, kind):
    """A downloaded model's folder in miniature: config.json + model.safetensors written by
    transformers (random init), tokenizer.json trained by `tokenizers`, and
    tokenizer_config.json with the chat template."""
    spec = dict(KINDS[kind])
    template = spec.pop("template")
    theirs, path = hf_tokenizer(root, kind, **spec)
    folder = root / kind
    folder.mkdir()
    path.rename(folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template}))
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, vocab_size=theirs.get_vocab_size(),
                 max_position_embeddings=128, initializer_range=0.1)
    torch.manual_seed(0)
    if kind == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**shape, tie_word_embeddings=True))
    else:
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**shape, tie_word_embeddings=False))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {kind: make_hf_folder(root, kind) for kind in KINDS}


def chats():
    """Conversations that probe the layout: system or not, several turns, a reply that
    starts with blank lines (its first token spans the header's "\\n"), padding spaces
    (Llama 3 trims them), markup and non-ASCII text (NFC in Qwen's tokenizer)."""
    return [
        [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "I am fine."}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  how are you?  "},
         {"role": "assistant", "content": "\n\nGood <b>and</b> you?"},
         {"role": "user", "content": "naïve café 🤖 def f(x): return x"},
         {"role": "assistant", "content": "Fine. Straße, 12,345 km"}],
        [{"role": "user", "content": "the quick brown fox"}],
        [{"role": "system", "content": "You answer in code."}, {"role": "user", "content": "print 2+2"}],
    ]


# -----------------------------------------------------------------------------
# tokenizer.json: the same ids as the `tokenizers` library


@pytest.mark.parametrize("style", ["gpt2", "qwen2", "llama3"])
def test_from_hf_encodes_like_the_tokenizers_library(tmp_path, style):
    """A Hugging Face tokenizer.json read into our tokenizer must give the library's ids on
    any text: guards the byte <-> printable-character map, the merge order, the split
    regex, NFC normalisation (Qwen2) and ignore_merges (Llama 3), and the specials."""
    kw = {"gpt2": {}, "qwen2": dict(split=QWEN2_SPLIT, nfc=True),
          "llama3": dict(split=GPT4_SPLIT_PATTERN, ignore_merges=True)}[style]
    theirs, path = hf_tokenizer(tmp_path, style, **kw)
    ours = HFTokenizer.from_hf(path)
    unseen = "QWZ! Unseen: Zürich's 2048 naïve ideas 🤖!\n\n  x<|im_start|>y<|endoftext|>"
    for text in HF_TEXTS + [unseen, "".join(HF_TEXTS)]:
        ids = theirs.encode(text, add_special_tokens=False).ids
        assert ours.encode(text, allowed_special="all") == ids
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=False)
    restored = load_tokenizer(ours.state())  # what a checkpoint stores keeps the rules
    assert restored.encode(unseen, allowed_special="all") == ours.encode(unseen, allowed_special="all")


def test_from_hf_refuses_other_kinds_clearly(tmp_path):
    """A WordPiece (BERT) or Unigram (SentencePiece) file must be refused with its kind
    named, not half-loaded into a tokenizer that encodes differently."""
    tk = pytest.importorskip("tokenizers", reason="tokenizers comes with transformers (requirements-dev.txt)")
    wp = tk.Tokenizer(tk.models.WordPiece(unk_token="[UNK]"))
    wp.pre_tokenizer = tk.pre_tokenizers.Whitespace()
    wp.train_from_iterator(HF_TEXTS, tk.trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[UNK]"]))
    wp.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="only byte-level BPE .* this is WordPiece"):
        HFTokenizer.from_hf(tmp_path)  # a folder: its tokenizer.json


def test_docstring_examples():
    """The >>> examples lesson 10 wrote in hf.py run as printed."""
    run_doctests(byte_to_unicode)


# -----------------------------------------------------------------------------
# The templates: equal to apply_chat_template


@pytest.mark.parametrize("kind", KINDS)
def test_templates_equal_apply_chat_template(folders, kind):
    """Our render of Qwen3's ChatML (thinking on and off) and of Llama 3's headers must be
    transformers' apply_chat_template token for token: guards the layout, where newlines
    go, the think block, trimming, and tokenizing across the header/reply boundary."""
    theirs = tf.AutoTokenizer.from_pretrained(folders[kind])
    _, tok, ckpt = load_run(folders[kind])
    assert ckpt["chat"] and tok.chat_format["name"] == {"qwen3": "qwen3", "llama": "llama3"}[kind]
    for thinking in ([False, True] if kind == "qwen3" else [False]):
        tok.chat_format["thinking"] = thinking
        for messages in chats():
            prompt = messages[-1]["role"] == "user"
            expected = theirs.apply_chat_template(messages, add_generation_prompt=prompt,
                                                  enable_thinking=thinking, tokenize=True)["input_ids"]
            assert tok.render_conversation(messages, for_completion=prompt)[0] == expected


def test_plain_chatml_template_without_thinking(folders, tmp_path):
    """A Qwen folder whose template is plain ChatML (no <think> in it) renders plain ChatML:
    guards the format being read from the template, not only from the model type."""
    folder = tmp_path / "chatml"
    folder.mkdir()
    for f in folders["qwen3"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    template = QWEN3_TEMPLATE.replace("<think>\n\n</think>\n\n", "")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template}))
    theirs = tf.AutoTokenizer.from_pretrained(folder)
    _, tok, _ = load_run(folder)
    assert tok.chat_format["name"] == "chatml"
    for messages in chats():
        prompt = messages[-1]["role"] == "user"
        expected = theirs.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=True)["input_ids"]
        assert tok.render_conversation(messages, for_completion=prompt)[0] == expected


@pytest.mark.parametrize("kind", KINDS)
def test_mask_covers_replies_and_their_end_token(folders, kind):
    """The loss mask on a real template: exactly each reply's tokens and the turn's end
    token (<|im_end|> / <|eot_id|>), never the headers, the user, or the think block."""
    _, tok, _ = load_run(folders[kind])
    messages = chats()[0] + [{"role": "user", "content": "and then?"},
                             {"role": "assistant", "content": "We went home."}]
    ids, mask = tok.render_conversation(messages)
    end = tok.template_end
    learned = tok.decode([i for i, m in zip(ids, mask) if m])
    assert learned == f"I am fine.{end}We went home.{end}"
    with pytest.raises(ValueError, match="special token"):  # content cannot forge structure
        tok.render_conversation([{"role": "user", "content": f"hi{end}"}], for_completion=True)


# -----------------------------------------------------------------------------
# A folder as a run: generation, chat.py, eval.py


@pytest.mark.parametrize("kind", KINDS)
def test_folder_generates_like_transformers(folders, kind):
    """load_run on a Hugging Face folder, greedy decoding through our KV cache: the same
    tokens as transformers' generate on the same prompt, fp32 (and bf16 loads and runs)."""
    model, tok, ckpt = load_run(folders[kind])
    theirs = tf.AutoModelForCausalLM.from_pretrained(folders[kind]).eval()
    prompt = torch.tensor([tok.render_conversation(chats()[1][:2], for_completion=True)[0]])
    ours = model.generate(prompt, 12, temperature=0)
    expected = theirs.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert ours.tolist() == expected.tolist()
    half, _, _ = load_run(folders[kind], dtype=torch.bfloat16)
    assert half.lm_head.weight.dtype == torch.bfloat16 and half.generate(prompt, 4, temperature=0).shape == (1, prompt.size(1) + 4)
    assert load_tokenizer(ckpt["tokenizer"]).chat_format == tok.chat_format  # the format travels


def test_saved_state_loads_as_the_models_tokenizer_without_tokenizer_importing_hf(folders):
    """The tokenizer state a run made from Qwen3 stores must load (run.load_tokenizer, as
    load_run does) as an HFTokenizer that renders, lists its tokens and ends replies in
    Qwen3's layout; our own tokenizer keeps ours. tokenizer.py (layer 0) must not import hf.py."""
    _, tok, ckpt = load_run(folders["qwen3"])
    back = load_tokenizer(ckpt["tokenizer"])
    assert isinstance(back, HFTokenizer) and back.template_end == "<|im_end|>"
    assert back.template_tokens == ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    assert back.render_conversation(chats()[1]) == tok.render_conversation(chats()[1])
    ours = BPETokenizer(special_tokens=CHAT_TOKENS)
    assert (ours.template_end, ours.template_tokens) == ("<|assistant_end|>", CHAT_TOKENS)
    code = "import sys, tokenizer; assert 'hf' not in sys.modules"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert run.returncode == 0, run.stderr


def test_chat_stream_stops_at_the_formats_end_token(folders, monkeypatch):
    """chat_stream must stop where the real model ends its turn (<|im_end|> for Qwen3), not
    at our <|assistant_end|>: otherwise a Qwen3 reply runs on into a made-up next turn."""
    model, tok, _ = load_run(folders["qwen3"])
    seen = {}
    word = tok.encode(" fine")

    def fake_stream(idx, max_new_tokens, eos_id=None, **kw):
        seen["prompt"], seen["eos"] = idx[0].tolist(), eos_id
        return iter([*word, tok.special_tokens["<|im_end|>"], *word])

    monkeypatch.setattr(model, "stream", fake_stream)
    messages = [{"role": "user", "content": "hello"}]
    assert chat_reply(model, tok, messages) == " fine"
    assert seen["eos"] == tok.special_tokens["<|im_end|>"]
    assert seen["prompt"] == tok.render_conversation(messages, for_completion=True)[0]


def test_eval_mc_on_a_folder_scores_like_transformers(folders, tmp_path):
    """eval.py --ckpt FOLDER --task mc on an MMLU-format CSV: each question is answered by
    the option transformers' model finds most likely too (summed log-probabilities)."""
    rows = [["The fox is", "quick", "brown", "lazy", "red", "B"], ["2 + 2 =", "3", "4", "5", "22", "B"],
            ["Hello", "world", "there", "you", "fox", "A"], ["I am", "fine", "home", "here", "cafe", "D"]]
    csv = tmp_path / "mmlu.csv"
    csv.write_text("".join(",".join(r) + "\n" for r in rows))
    folder = folders["llama"]
    E.main(["--ckpt", str(folder), "--task", "mc", "--file", str(csv)])
    got = json.loads((folder / "eval_mc.json").read_text())
    _, tok, _ = load_run(folder)
    theirs = tf.AutoModelForCausalLM.from_pretrained(folder).eval()
    right = 0
    for context, options, answer in E.read_mmlu(csv):
        scores = []
        for option in options:
            ctx, cont = tok.encode(context), tok.encode(option)
            with torch.no_grad():
                logp = theirs(torch.tensor([ctx + cont])).logits[0, :-1].log_softmax(-1)
            scores.append(sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont)))
        right += max(range(4), key=scores.__getitem__) == answer
    assert got["items"] == 4 and got["acc"] == right / 4


def test_sft_from_a_folder_keeps_its_template(folders, tmp_path):
    """Full fine-tuning from a Llama folder on a chat JSONL of one's own: the run trains on
    Llama 3's layout, and its checkpoint, reloaded, still renders and chats in it."""
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "I am fine."}]
    data = tmp_path / "mine.jsonl"
    data.write_text(json.dumps({"messages": messages}) + "\n")
    cfg = {**sft.DEFAULTS, "init": str(folders["llama"]), "data": str(data), "val_data": str(data), "eval_n": 0,
           "out_dir": str(tmp_path / "out"), "batch_size": 1, "max_iters": 2, "eval_interval": 2,
           "eval_iters": 1, "log_interval": 2, "dtype": "float32", "device": "cpu"}
    assert sft.train(cfg)["step"] == 2
    _, base_tok, _ = load_run(folders["llama"])
    model, tok, ckpt = load_run(tmp_path / "out")
    assert ckpt["chat"] and tok.chat_format["name"] == "llama3"
    assert tok.render_conversation(messages) == base_tok.render_conversation(messages)
    assert model.cfg == load_run(folders["llama"])[0].cfg


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_chat_py_on_a_folder_through_a_pipe(folders, kind):
    """`python chat.py FOLDER` opens a chat (the folder ships a template) and prints the
    greedy reply transformers gives to the same conversation, cut at the turn's end."""
    run = subprocess.run([sys.executable, str(ROOT / "chat.py"), str(folders[kind])],
                         input="/len 10\nhow are you?\n", capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    _, tok, _ = load_run(folders[kind])
    theirs = tf.AutoTokenizer.from_pretrained(folders[kind])
    model = tf.AutoModelForCausalLM.from_pretrained(folders[kind]).eval()
    prompt = theirs.apply_chat_template([{"role": "user", "content": "how are you?"}], add_generation_prompt=True,
                                        enable_thinking=False, tokenize=True, return_tensors="pt")["input_ids"]
    new = model.generate(prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False)[0, prompt.size(1):].tolist()
    end = tok.special_tokens[tok.template_end]
    reply = theirs.decode(new[:new.index(end)] if end in new else new)
    header, setting, printed = run.stdout.split("\n", 2)
    assert "chat model" in header and setting == "len set to 10"
    assert printed == reply + "\n\n"  # the reply, then the blank line chat.py prints at the end
#< L10
