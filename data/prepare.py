#> L06 prepare
"""
prepare.py -- turn a corpus into the token files pretrain.py reads.

    python data/prepare.py storyworld           # built in, offline, ~6 MB in seconds
    python data/prepare.py shakespeare_char     # Tiny Shakespeare, one token per character
    python data/prepare.py shakespeare          # Tiny Shakespeare, byte-level BPE
    python data/prepare.py tinystories          # a TinyStories subset (download)

Each writes data/<name>/: train.bin and val.bin (token ids as uint16, one
long stream with <|endoftext|> between documents), tokenizer.json and
meta.json (vocabulary size, token counts, where the text came from).
Downloads resume a partial file, check a SHA-256 where one is known, and say
where to put the file by hand when there is no network (--source FILE).
"""

import argparse
import hashlib
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run as a script: find tokenizer.py one folder up
sys.path.insert(0, str(HERE))

import storyworld  # noqa: E402
from tokenizer import BPETokenizer, CharTokenizer  # noqa: E402

EOT = "<|endoftext|>"
SOURCES = {
    # Karpathy's char-rnn copy; its SHA-256 was taken from the course's shared copy.
    "shakespeare": ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
                    "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
    # TinyStories (Eldan & Li 2023), its validation file (~19 MB). No digest pinned: the
    # first download prints one to pin here.
    "tinystories": ("https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories-valid.txt",
                    None),
}


# -----------------------------------------------------------------------------
# Downloading: resumable, verified, and honest when offline


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(url, dest, digest=None, timeout=30):
    """Fetch url to dest. A partial dest.part is resumed with an HTTP Range request;
    a wrong SHA-256 deletes the file and raises; a dropped connection keeps the
    part for the next try."""
    dest = Path(dest)
    if dest.exists():
        return dest
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except (urllib.error.URLError, OSError) as e:
        raise RuntimeError(f"could not download {url} ({getattr(e, 'reason', e)}). Offline? Download "
                           f"it by hand to {dest}, or pass --source FILE") from None
    with response:
        if have and response.status != 206:  # the server ignored Range: start again
            have = 0
        total = have + int(response.headers.get("Content-Length", 0))
        done, t0 = have, time.time()
        with open(part, "ab" if have else "wb") as f:
            while block := response.read(1 << 16):
                f.write(block)
                done += len(block)
                rate = (done - have) / max(time.time() - t0, 1e-9) / 1e6
                print(f"\rdownloading {dest.name}: {done / 1e6:.1f}/{total / 1e6:.1f} MB  {rate:.1f} MB/s",
                      end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    if total and done < total:
        raise RuntimeError(f"download of {url} stopped at {done} of {total} bytes; run again to resume")
    if digest and sha256(part) != digest:
        part.unlink()
        raise RuntimeError(f"{dest.name} is corrupt (SHA-256 mismatch); deleted, run again")
    if not digest:
        print(f"{dest.name}: SHA-256 {sha256(part)} (no digest pinned to check against)")
    os.replace(part, dest)
    return dest


# -----------------------------------------------------------------------------
# Writing token files


def write_dataset(out, tok, kind, train_ids, val_ids, source, **extra):
    """uint16 token files + tokenizer + meta.json. uint16 halves the disk and memory of
    int32; it holds ids below 65,536, enough for every vocabulary here."""
    out.mkdir(parents=True, exist_ok=True)
    if tok.vocab_size > 2 ** 16:
        raise ValueError(f"vocab_size {tok.vocab_size} does not fit in uint16 token files")
    for split, ids in (("train", train_ids), ("val", val_ids)):
        np.asarray(ids, dtype=np.uint16).tofile(out / f"{split}.bin")
    tok.save(out / "tokenizer.json")
    meta = {"tokenizer": "tokenizer.json", "tokenizer_kind": kind, "vocab_size": tok.vocab_size,
            "train_tokens": len(train_ids), "val_tokens": len(val_ids), "source": source, **extra}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    print(f"wrote {out}: {len(train_ids):,} train and {len(val_ids):,} val tokens, vocab {tok.vocab_size}")
    return meta


def encode_documents(tok, docs):
    """Concatenate documents with <|endoftext|> after each: the model learns where
    a story ends, and generation can stop there."""
    enc, eot = tok.to_tiktoken(), tok.special_tokens[EOT]
    ids = []
    for doc in enc.encode_ordinary_batch(docs):
        ids.extend(doc)
        ids.append(eot)
    return ids


def prepare_storyworld(out, stories=14000, val_stories=700, vocab_size=2048, seed=1337):
    """Stories 0..n-1 train, the next ones val: held-out stories, never seen in training."""
    t0 = time.time()
    train = [s.text for s in storyworld.stories(seed, 0, stories)]
    val = [s.text for s in storyworld.stories(seed, stories, val_stories)]
    print(f"generated {stories + val_stories:,} stories ({sum(map(len, train)) / 1e6:.1f} MB) "
          f"in {time.time() - t0:.1f}s; the world holds ~10^{storyworld.count_stories():.0f}")
    specials = [EOT]
    #> L10 chat-tokens
    # Reserve the chat template's tokens now: pretraining never sees them, but the base
    # model then has an embedding row for each, and sft.py fine-tunes it with no surgery.
    from tokenizer import CHAT_TOKENS

    specials += CHAT_TOKENS
    #< L10
    tok = BPETokenizer(special_tokens=specials).train("\n".join(train), vocab_size)
    return write_dataset(out, tok, "bpe", encode_documents(tok, train), encode_documents(tok, val),
                         "storyworld", seed=seed, eot_id=tok.special_tokens[EOT])


#> L10 sft-data
def prepare_sft(out, stories=14000, val_stories=700, seed=1337):
    """The chat JSONL files of lesson 10, split by story exactly as prepare_storyworld:
    held-out conversations are about the stories pretraining kept for validation."""
    out.mkdir(parents=True, exist_ok=True)
    for name, chats in storyworld.sft_sets(seed, stories, val_stories).items():
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"messages": chat}) + "\n" for chat in chats)
        print(f"wrote {out / name}.jsonl: {len(chats):,} conversations")


CHAT_DATA = {"sft": prepare_sft}  # chat-format sets: name -> writer(out, stories, val_stories)
#< L10
#> L11 dpo-data
def prepare_dpo(out, stories=14000, val_stories=700, seed=1337, train_stories=2000):
    """Preference pairs for lesson 11 in TRL's chat format, split by story like the SFT
    sets: a question about a story, its right answer (chosen) against a plausible wrong
    one of the same type (rejected). Training pairs come from the first train_stories
    stories of pretraining's train split (6 pairs each), held-out pairs from its val split."""
    import random

    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{seed}-dpo")  # the wrong answers: a fixed draw for a fixed seed
    for name, start, count in (("train", 0, train_stories), ("val", stories, val_stories)):
        rows = []
        for story in storyworld.stories(seed, start, count):
            for prompt, chosen, rejected in storyworld.preference_pairs(story, rng):
                # preference_pairs writes a base-model prompt; the chat form asks the same question
                question = prompt.rsplit("\nQuestion: ", 1)[1].removesuffix("\nAnswer:")
                rows.append({"prompt": [storyworld.turn("user", storyworld.question_turn(story, question))],
                             "chosen": [storyworld.turn("assistant", chosen.strip())],
                             "rejected": [storyworld.turn("assistant", rejected.strip())]})
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        print(f"wrote {out / name}.jsonl: {len(rows):,} preference pairs")


CHAT_DATA["dpo"] = prepare_dpo  # python data/prepare.py dpo
#< L11
def read_source(name, source, out):
    url, digest = SOURCES[name]
    if source:  # a file the user brought: check it like a download
        if digest and sha256(source) != digest:
            raise RuntimeError(f"{source} does not match the SHA-256 of {name}")
        return Path(source).read_text(encoding="utf-8")
    return download(url, out / Path(url).name, digest).read_text(encoding="utf-8")


def prepare_shakespeare(out, char=False, vocab_size=1024, source=None):
    """First 90% train, last 10% val, as nanoGPT, so the numbers compare."""
    text = read_source("shakespeare", source, out)
    n = int(0.9 * len(text))
    if char:
        tok = CharTokenizer.train(text)
        return write_dataset(out, tok, "char", tok.encode(text[:n]), tok.encode(text[n:]), "shakespeare")
    tok = BPETokenizer(special_tokens=[EOT]).train(text[:n], vocab_size)
    enc = tok.to_tiktoken()
    return write_dataset(out, tok, "bpe", enc.encode_ordinary(text[:n]), enc.encode_ordinary(text[n:]),
                         "shakespeare", eot_id=tok.special_tokens[EOT])


def prepare_tinystories(out, max_mb=20, vocab_size=4096, source=None):
    text = read_source("tinystories", source, out)[: int(max_mb * 1e6)]
    docs = [d.strip() for d in text.split(EOT) if d.strip()]
    n = int(0.95 * len(docs))
    tok = BPETokenizer(special_tokens=[EOT]).train("\n".join(docs[:n]), vocab_size)
    return write_dataset(out, tok, "bpe", encode_documents(tok, docs[:n]),
                         encode_documents(tok, docs[n:]), "tinystories", eot_id=tok.special_tokens[EOT])


def main(argv=None):
    ap = argparse.ArgumentParser(description="Prepare token files for pretrain.py.")
    datasets = ["storyworld", "shakespeare_char", "shakespeare", "tinystories"]
    #> L10 sft-data
    datasets += list(CHAT_DATA)  # chat JSONL for sft.py (and align.py), from the story world
    ap.add_argument("--if_stale", action="store_true", help="chat sets: only if missing or out of date")
    #< L10
    ap.add_argument("dataset", choices=datasets)
    ap.add_argument("--out", help="folder (default data/<dataset>)")
    ap.add_argument("--source", help="a local copy of the corpus instead of downloading")
    ap.add_argument("--stories", type=int, default=14000, help="storyworld: training stories")
    ap.add_argument("--vocab_size", type=int, help="BPE vocabulary size")
    args = ap.parse_args(argv)
    out = Path(args.out or HERE / args.dataset)
    vocab = {"vocab_size": args.vocab_size} if args.vocab_size else {}
    if args.dataset == "storyworld":
        return prepare_storyworld(out, args.stories, max(1, args.stories // 20), **vocab)
    #> L10 sft-data
    if args.dataset in CHAT_DATA:
        # The sets are a function of the code that writes them and the story count. Stamp them
        # with both, so that --if_stale (what sft.py, eval.py and align.py run) remakes a set a
        # pull changed (new answer wordings, say) instead of training on the old one in silence.
        meta = out / "meta.json"
        try:
            old = dict(json.loads(meta.read_text()))
        except (OSError, ValueError, TypeError):  # none yet, or unreadable: stale
            old = {}
        stories = old.get("stories", args.stories) if args.if_stale else args.stories
        stamp = {"code": [sha256(HERE / f) for f in ("storyworld.py", "prepare.py")], "stories": stories}
        fresh = old.get("code") == stamp["code"] and old.get("files") and all((out / f).exists() for f in old["files"])
        if args.if_stale and fresh:
            return
        if args.if_stale and any(out.glob("*.jsonl")):  # kept beside, never overwritten unseen
            print(f"{out} was made by another data/storyworld.py or prepare.py: making it again "
                  "(the old files are kept as *.jsonl.old)")
            for f in out.glob("*.jsonl"):
                f.replace(f.with_suffix(".jsonl.old"))
        meta.unlink(missing_ok=True)
        CHAT_DATA[args.dataset](out, stories, max(1, stories // 20))
        stamp["files"] = sorted(f.name for f in out.glob("*.jsonl"))
        meta.write_text(json.dumps(stamp) + "\n")  # last: a half-written set stays stale
        return
    #< L10
    if args.dataset == "tinystories":
        return prepare_tinystories(out, source=args.source, **vocab)
    return prepare_shakespeare(out, args.dataset == "shakespeare_char", source=args.source, **vocab)


if __name__ == "__main__":
    try:
        main()
    except RuntimeError as e:
        sys.exit(f"prepare.py: {e}")
#< L06
