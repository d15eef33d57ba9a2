#> L06 tests
"""Lesson 06: the story world, token files, batches, downloads and config loading."""

import hashlib
import http.server
import random
import threading

import numpy as np
import pytest
import torch

import prepare
import storyworld
from run import load_config
from pretrain import Batches


def test_stories_are_a_pure_function_of_seed_and_index():
    a = [s.text for s in storyworld.stories(7, 0, 5)]
    assert a == [s.text for s in storyworld.stories(7, 0, 5)]
    assert a[3] == next(storyworld.stories(7, 3, 1)).text  # story i does not depend on i-1
    assert a != [s.text for s in storyworld.stories(8, 0, 5)]
    assert storyworld.count_stories() > 15  # > 10^15 distinct stories


def test_facts_and_task_answers_agree_with_the_text():
    """Every question's exact answer must be readable from its story: a generator that
    changed its state without saying so would teach wrong answers."""
    rng = random.Random(0)
    for story in storyworld.stories(1, 0, 50):
        f, text = story.facts, story.text
        assert f["found_at"] in text and f["colour"] in text and f["lost"] in text
        # what lesson 10's lookups lean on: the place three times, the kind after the name
        assert text.count(f["found_at"]) >= 3 and f"{f['friend']} the {f['friend_kind']}" in text
        assert f"had lost {f['friend_their']} {f['lost']}." in text
        assert f"{f['owner']} had the" in text or f"was with {f['owner']}" in text
        assert (f"to {f['friend']}" in text or "gave it to" in text) == f["gave"]
        asks = [key for _, _, key in storyworld.QUESTIONS]
        for (question, answer), key in zip(storyworld.story_questions(story), asks):
            assert f[key] in text and f[key] in answer, question
        for (question, options, k), key in zip(storyworld.multiple_choice(story, rng), asks):
            assert len(options) == len(set(options)) == 4 and options[k] == f[key], question
        pairs = storyworld.preference_pairs(story, rng)
        for (prompt, chosen, rejected), (question, answer), key in zip(pairs, storyworld.story_questions(story), asks):
            assert prompt == f"{text}\nQuestion: {question}\nAnswer:" and chosen == " " + answer
            assert f[key] not in rejected, rejected  # the same answer, with a wrong fact in it
    for _ in range(100):
        question, answer = storyworld.arithmetic(rng)
        a, op, b = question.removeprefix("What is ").rstrip("?").split()
        assert int(answer) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    meta = prepare.prepare_storyworld(out, stories=300, val_stories=30, vocab_size=400)
    return out, meta


def test_prepared_token_files_decode_to_the_stories(tiny_world):
    out, meta = tiny_world
    from tokenizer import BPETokenizer

    tok = BPETokenizer.load(out / "tokenizer.json")
    train = np.fromfile(out / "train.bin", dtype=np.uint16)
    assert len(train) == meta["train_tokens"] and train.max() < meta["vocab_size"] == tok.vocab_size
    docs = tok.decode(train.tolist()).split("<|endoftext|>")
    assert docs[:-1] == [s.text for s in storyworld.stories(1337, 0, 300)] and docs[-1] == ""
    val = tok.decode(np.fromfile(out / "val.bin", dtype=np.uint16).tolist())
    assert val.split("<|endoftext|>")[0] == next(storyworld.stories(1337, 300, 1)).text  # held out


def test_load_tokenizer_reads_either_kind(tiny_world, tmp_path):
    """pretrain, eval and chat load whatever tokenizer a dataset was prepared with."""
    from run import load_tokenizer
    from tokenizer import BPETokenizer, CharTokenizer

    out, _ = tiny_world
    assert isinstance(load_tokenizer(out / "tokenizer.json"), BPETokenizer)
    CharTokenizer.train("ab").save(tmp_path / "c.json")
    assert load_tokenizer(tmp_path / "c.json").decode([1, 0]) == "ba"
    (tmp_path / "x.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not a intro2llm-char or intro2llm-bpe tokenizer file"):
        load_tokenizer(tmp_path / "x.json")


def test_batches_are_shifted_windows_and_deterministic(tiny_world):
    out, _ = tiny_world
    data = np.fromfile(out / "train.bin", dtype=np.uint16)
    batches = Batches(out / "train.bin", block_size=32, batch_size=4, seed=0)
    x, y = batches.get(5)
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    windows = np.lib.stride_tricks.sliding_window_view(data, 33)  # every 33-token window of the file
    for xr, yr in zip(x, y):  # each (x, y) row is one real window: x = w[:-1], y = w[1:]
        w = np.concatenate([xr.numpy(), yr.numpy()[-1:]])
        assert (windows == w).all(axis=1).any()
    assert torch.equal(batches.get(5)[0], x) and not torch.equal(batches.get(6)[0], x)


def test_data_shorter_than_the_block_is_a_clear_error(tmp_path):
    np.arange(10, dtype=np.uint16).tofile(tmp_path / "t.bin")
    with pytest.raises(ValueError, match="holds 10 tokens, fewer than block_size \\+ 1 = 17"):
        Batches(tmp_path / "t.bin", block_size=16, batch_size=2, seed=0)


# ---- downloads, against a server on 127.0.0.1 ----------------------------------

PAYLOAD = bytes(random.Random(0).randbytes(300_000))


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD with Range support; /truncated stops halfway, /corrupt flips a byte."""

    def do_GET(self):
        body = PAYLOAD if self.path != "/corrupt" else b"x" + PAYLOAD[1:]
        start = int(self.headers.get("Range", "bytes=0-")[6:].rstrip("-") or 0)
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        end = len(body) // 2 if self.path == "/truncated" and not start else len(body)
        self.wfile.write(body[start:end])

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_download_verifies_resumes_and_rejects_corruption(server, tmp_path):
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    assert prepare.download(f"{server}/ok", tmp_path / "a.txt", digest).read_bytes() == PAYLOAD
    dest = tmp_path / "b.txt"
    with pytest.raises(RuntimeError, match="stopped at 150000 of 300000 bytes; run again to resume"):
        prepare.download(f"{server}/truncated", dest, digest)
    assert (tmp_path / "b.txt.part").stat().st_size == 150_000 and not dest.exists()
    prepare.download(f"{server}/truncated", dest, digest)  # resumes with a Range request
    assert dest.read_bytes() == PAYLOAD
    with pytest.raises(RuntimeError, match="corrupt \\(SHA-256 mismatch\\); deleted"):
        prepare.download(f"{server}/corrupt", tmp_path / "c.txt", digest)
    assert not (tmp_path / "c.txt").exists() and not (tmp_path / "c.txt.part").exists()


def test_download_offline_says_where_to_put_the_file(tmp_path):
    with pytest.raises(RuntimeError, match="Offline\\? Download it by hand to .*d.txt"):
        prepare.download("http://127.0.0.1:9/x", tmp_path / "d.txt")  # port 9: nothing listens


# ---- config files -------------------------------------------------------------


def test_load_config_parses_literals_overrides_and_rejects_bad_input(tmp_path, capsys):
    defaults = dict(lr=1e-3, batch_size=8, dataset="storyworld", compile=False, n_layer=None)
    path = tmp_path / "c.py"
    path.write_text('# comment\nlr = 3e-4  # peak\nbatch_size = 16\ndataset = "a#b"\n')
    cfg = load_config(path, defaults, ["--batch_size=4", "--compile", "--n_layer=2", "--lr=1"])
    assert cfg == dict(lr=1.0, batch_size=4, dataset="a#b", compile=True, n_layer=2)
    assert "config: lr=1.0, batch_size=4" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown config key 'lrr'; valid keys: batch_size, compile"):
        load_config(path, defaults, ["--lrr=1"])
    with pytest.raises(ValueError, match="batch_size must be int, got 'big'"):
        load_config(path, defaults, ["--batch_size=big"])
    path.write_text("import os\n")
    with pytest.raises(ValueError, match="c.py:1: expected `name = value`"):
        load_config(path, defaults)
    path.write_text("lr = __import__('os').getcwd()\n")
    with pytest.raises(ValueError, match="c.py:1: the value of lr must be a literal"):
        load_config(path, defaults)
#< L06
