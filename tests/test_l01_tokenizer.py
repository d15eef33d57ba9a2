#> L01 tests
"""Lesson 01: the char and BPE tokenizers, tiktoken parity, and the token embedding."""

import json
import os
import random

import pytest
import torch

import tokenizer as T
from model import TokenEmbedding

from conftest import run_doctests

SAMPLES = [
    "",
    "hello world",
    "Crème brûlée à la française, naïve café.",
    "日本語のテキストと中文文本",
    "emoji 🙂👍🏽 and flags 🇫🇷 — ok",
    "tabs\tand\n\nnewlines \r\n  spaces   end  ",
    "def f(x):\n    return x ** 2  # code!\n",
]


def random_unicode(seed, n=400):
    """Seeded text mixing ASCII, Latin-1, CJK and astral-plane code points."""
    rng = random.Random(seed)
    ranges = [(32, 127), (0xA0, 0x250), (0x4E00, 0x4F00), (0x1F300, 0x1F64F), (9, 14)]
    return "".join(chr(rng.randrange(*rng.choice(ranges))) for _ in range(n))


def word_soup(seed, n=3000):
    """Text with English-like repetition, so BPE has frequent pairs to learn."""
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "théâtre", "naïve", "42", "1999", "中文",
             "🙂", "don't", "I'm", "it's", "!!", "...", "\n", "  "]
    return " ".join(rng.choice(words) for _ in range(n))


@pytest.fixture(scope="module")
def bpe():
    return T.BPETokenizer(special_tokens=["<|endoftext|>", "<|user|>"]).train(word_soup(0), 300)


@pytest.fixture(scope="module")
def cl100k():
    """tiktoken's official cl100k_base, read offline from ../shared's cache."""
    import tiktoken

    shared = os.environ.get("INTRO2LLM_SHARED", os.path.join(os.path.dirname(__file__), "..", "..", "shared"))
    cache = os.path.join(shared, "data", "tiktoken_cache")
    if not os.path.isdir(cache):
        pytest.skip(f"needs tiktoken's cl100k_base cache in {cache} (the course's shared folder)")
    os.environ["TIKTOKEN_CACHE_DIR"] = cache
    return tiktoken.get_encoding("cl100k_base")


# ---- round trips -------------------------------------------------------------


@pytest.mark.parametrize("text", SAMPLES + [random_unicode(s) for s in range(3)])
def test_roundtrip_every_tokenizer_and_encoder(bpe, text):
    """decode(encode(x)) == x for both tokenizers and both encoders: guards lost bytes
    (e.g. a regex that drops characters) and broken UTF-8 handling."""
    char = T.CharTokenizer.train(text)
    assert char.decode(char.encode(text)) == text
    ids = bpe.encode_ordinary(text)
    assert bpe.decode(ids) == text
    assert bpe.to_tiktoken().decode(bpe.to_tiktoken().encode_ordinary(text)) == text
    assert "".join(bpe.split(text)) == text  # pre-splitting loses nothing


def test_char_tokenizer_ids_save_load_and_unknown_char(tmp_path):
    tok = T.CharTokenizer.train("hello world")
    assert tok.chars == " dehlorw" and tok.vocab_size == 8
    assert tok.encode("low") == [4, 5, 7]
    tok.save(tmp_path / "c.json")
    assert T.CharTokenizer.load(tmp_path / "c.json").encode("hold") == tok.encode("hold")
    with pytest.raises(ValueError, match="'z' is not in this tokenizer's vocabulary"):
        tok.encode("zoo")


# ---- training ----------------------------------------------------------------


def test_hand_worked_example():
    """The classic "aaabdaaabac" (a=97 b=98 c=99 d=100), three merges, by hand:

    1. counts aa:4 ab:2 bd:1 da:1 ba:1 ac:1         -> (97, 97) = 256
       "aaab" -> [256, 97, 98]: non-overlapping, leftmost first
    2. counts (256,97):2 (97,98):2 others 1: a tie; the smaller pair wins
                                                    -> (97, 98) = 257
    3. counts (256,257):2 others 1                  -> (256, 257) = 258
    encode -> [258, 100, 258, 97, 99]. (minbpe breaks the tie in step 2 by first
    occurrence and would merge (256, 97) instead.)"""
    tok = T.BPETokenizer().train("aaabdaaabac", 259)
    assert list(tok.merges.items()) == [((97, 97), 256), ((97, 98), 257), ((256, 257), 258)]
    assert tok.encode("aaabdaaabac") == [258, 100, 258, 97, 99]
    assert tok.vocab[258] == b"aaab" and tok.vocab_size == 259


@pytest.mark.parametrize("text, vocab_size", [
    (word_soup(1, 1500), 330),
    (random_unicode(7, 800), 300),
    ("aaaa aaaaaaa aaa " * 20 + "abababab baba", 270),  # overlapping runs and ties
    ("".join(random.Random(3).choice("ab ") for _ in range(2000)), 300),  # pairs run out
])
def test_naive_and_fast_trainers_agree(text, vocab_size):
    """The fast trainer's incremental counts, pair index and lazy heap must reproduce the
    naive recount exactly, including tie-breaks and stopping when pairs run out."""
    chunks = [c.encode() for c in T.BPETokenizer().split(text)]
    n = vocab_size - 256
    assert T.train_fast(chunks, n) == T.train_naive(chunks, n)


def test_train_on_shakespeare_learns_common_words(shared):
    text = (shared / "data" / "tinyshakespeare.txt").read_text()[:200_000]
    tok = T.BPETokenizer().train(text, 512)
    tokens = {tok.vocab[i] for i in tok.merges.values()}
    assert {b" the", b" and", b"ing"} <= tokens
    assert len(tok.encode(text)) < 0.5 * len(text.encode())  # 512 tokens already halve English


def test_vocab_size_too_small_is_a_clear_error():
    with pytest.raises(ValueError, match="vocab_size 256 is too small: it must hold the 256 byte "
                                         "tokens and 1 special"):
        T.BPETokenizer(special_tokens=["<|endoftext|>"]).train("abc", 256)


# ---- encoding and tiktoken ---------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_our_encoder_equals_to_tiktoken(bpe, seed):
    """The pure-Python merge loop and tiktoken's Rust loop on the same ranks must agree."""
    text = word_soup(100 + seed, 500) + random_unicode(seed, 200)
    assert bpe.encode_ordinary(text) == bpe.to_tiktoken().encode_ordinary(text)


def test_cl100k_parity_on_shakespeare_and_a_multilingual_sample(cl100k, shared):
    """from_tiktoken must recover every merge of GPT-4's 100k vocabulary: one wrong merge
    shows up as a different id somewhere in 1 MB of text."""
    tok = T.BPETokenizer.from_tiktoken(cl100k)
    assert tok.vocab_size == cl100k.n_vocab
    text = (shared / "data" / "tinyshakespeare.txt").read_text()
    assert tok.encode_ordinary(text) == cl100k.encode_ordinary(text)
    sample = "\n".join(SAMPLES + [random_unicode(s, 2000) for s in range(3)]) + (
        "Привет, мир! Γειά σου Κόσμε! مرحبا بالعالم 🤖🚀 x=[i**2 for i in range(10)]\r\n\t}")
    assert tok.encode_ordinary(sample) == cl100k.encode_ordinary(sample)
    assert tok.encode("hi<|endoftext|>", allowed_special="all") == cl100k.encode(
        "hi<|endoftext|>", allowed_special="all")


def test_special_tokens_follow_tiktoken_semantics(bpe):
    text = "hello <|endoftext|> world <|user|>"
    enc = bpe.to_tiktoken()
    eot, user = bpe.special_tokens["<|endoftext|>"], bpe.special_tokens["<|user|>"]
    assert (eot, user) == (298, 299)  # specials sit after the 42 merges
    allowed = bpe.encode(text, allowed_special="all")
    assert allowed == enc.encode(text, allowed_special="all") and allowed.count(eot) == 1
    only_eot = bpe.encode(text, allowed_special={"<|endoftext|>"}, disallowed_special=())
    assert only_eot == enc.encode(text, allowed_special={"<|endoftext|>"}, disallowed_special=())
    assert user not in only_eot and eot in only_eot
    ordinary = bpe.encode(text, disallowed_special=())
    assert ordinary == bpe.encode_ordinary(text) and eot not in ordinary
    with pytest.raises(ValueError, match="special token '<|endoftext|>'; pass allowed_special"):
        bpe.encode(text)
    assert bpe.decode(allowed) == text


# ---- saving, loading, decoding ------------------------------------------------


def test_save_load_roundtrip_and_bad_files(bpe, tmp_path):
    path = tmp_path / "tok.json"
    bpe.save(path)
    back = T.BPETokenizer.load(path)
    text = word_soup(9, 300) + " <|user|>"
    assert back.encode(text, allowed_special="all") == bpe.encode(text, allowed_special="all")
    assert back.merges == bpe.merges and back.pattern == bpe.pattern
    data = json.loads(path.read_text())
    (tmp_path / "v.json").write_text(json.dumps({**data, "version": 99}))
    with pytest.raises(ValueError, match="format version 99, this code reads version 1"):
        T.BPETokenizer.load(tmp_path / "v.json")
    (tmp_path / "cut.json").write_text(path.read_text()[:200])
    with pytest.raises(ValueError, match="cannot read tokenizer file .*cut.json"):
        T.BPETokenizer.load(tmp_path / "cut.json")
    (tmp_path / "bad.json").write_text(json.dumps({**data, "merges": [[1, 2]]}))
    with pytest.raises(ValueError, match="bad.json is damaged"):
        T.BPETokenizer.load(tmp_path / "bad.json")
    (tmp_path / "c.json").write_text('{"format": "intro2llm-char", "version": 1, "chars": "ab"}')
    with pytest.raises(ValueError, match="is not a intro2llm-bpe tokenizer file"):
        T.BPETokenizer.load(tmp_path / "c.json")


def test_decode_errors_and_partial_utf8(bpe):
    with pytest.raises(ValueError, match="token id 300 is out of range for a vocabulary of 300"):
        bpe.decode([1, 300])
    ids = bpe.encode_ordinary("é")  # two bytes: 0xC3 0xA9
    assert bpe.decode_bytes(ids) == "é".encode()
    assert bpe.decode([0xC3]) == "\ufffd"  # half a character: replacement, no exception


def test_cli_train_and_show(tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text(word_soup(5, 2000))
    T.main(["train", "--input", str(src), "--vocab_size", "300", "--out", str(tmp_path / "t.json")])
    out = capsys.readouterr().out
    assert "trained 43 merges" in out and "first merges:" in out
    assert (tmp_path / "t.vocab").read_text().count("\n") == 300  # 256 + 43 + 1 special
    T.main(["show", str(tmp_path / "t.json"), "the cat<|endoftext|>"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[") and out[0].endswith("][<|endoftext|>]")  # no terminal: brackets
    assert out[0][1:-1].replace("][", "") == "the cat<|endoftext|>"
    assert out[1].startswith(f"{out[0].count('][') + 1} tokens: [")


# ---- the token embedding -----------------------------------------------------


def test_token_embedding_shape_and_gradient_flow():
    """The lookup equals one-hot @ W, and gradient reaches only the rows that were used."""
    torch.manual_seed(0)
    emb = TokenEmbedding(11, 8)
    idx = torch.tensor([[1, 2, 2], [5, 1, 0]])
    x = emb(idx)
    assert x.shape == (2, 3, 8) and x.dtype == torch.float32
    onehot = torch.nn.functional.one_hot(idx, 11).float()
    torch.testing.assert_close(x, onehot @ emb.weight)
    x.sum().backward()
    used = torch.zeros(11, dtype=torch.bool)
    used[idx.flatten()] = True
    assert (emb.weight.grad[~used] == 0).all()
    torch.testing.assert_close(emb.weight.grad[2], torch.full((8,), 2.0))  # token 2 used twice
    assert abs(emb.weight.std().item() - 0.02) < 0.01


def test_docstring_examples():
    """The >>> examples lesson 01 wrote run as printed (CI runs no --doctest-modules)."""
    run_doctests(T.CharTokenizer, T.count_pairs, T.merge, T.BPETokenizer.split, TokenEmbedding)
#< L01

