"""
bench.py -- the performance table: measured numbers, never timed unit tests.

    python bench.py                 # every section
    python bench.py tokenizer       # one section

Machines are shared and noisy, so each figure is the median of several runs,
and two things that are compared are timed alternately. Reference figures
from other projects were measured on this project's 2-core machine (noted in
the issue tracker) and are printed beside ours.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

SHARED = Path(os.environ.get("INTRO2LLM_SHARED", Path(__file__).resolve().parent.parent / "shared"))


def timed(fn, repeats=5):
    """Median wall time of fn() over `repeats` runs, and its last result."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def alternate(fa, fb, repeats=5):
    """Median times of fa and fb, run a, b, a, b, ... so drifting load hits both alike."""
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(timed(fa, 1)[0])
        tb.append(timed(fb, 1)[0])
    return statistics.median(ta), statistics.median(tb)


def row(name, ours, reference="", note=""):
    print(f"  {name:<44}{ours:>18}   {reference:<24}{note}")


# -----------------------------------------------------------------------------
# Tokenizer (lesson 01)


def bench_tokenizer():
    import tiktoken

    from tokenizer import BPETokenizer

    path = SHARED / "data" / "tinyshakespeare.txt"
    if not path.exists():
        print(f"  skipped: {path} not found (the course's shared data folder)")
        return
    text = path.read_text()
    mb = len(text.encode()) / 1e6
    print(f"tokenizer on Tiny Shakespeare ({mb:.2f} MB), single process")
    row("", "ours", "minbpe / tiktoken (ref)")
    for vocab, ref in ((512, "60 s"), (1024, "163 s"), (4096, "")):
        seconds, _ = timed(lambda: BPETokenizer().train(text, vocab), 3)
        row(f"train to vocab {vocab}", f"{seconds:.2f} s", ref)
    tok = BPETokenizer().train(text, 1024)

    def cold():
        tok.cache.clear()
        return tok.encode_ordinary(text)

    seconds, _ = timed(cold)
    row("pure-Python encode, empty chunk cache", f"{mb / seconds:.2f} MB/s", "0.9 MB/s (minbpe)")
    seconds, _ = timed(lambda: tok.encode_ordinary(text))
    row("pure-Python encode, warm chunk cache", f"{mb / seconds:.2f} MB/s")
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "data" / "tiktoken_cache"))
    cl100k = tiktoken.get_encoding("cl100k_base")
    ours = BPETokenizer.from_tiktoken(cl100k)
    mine = ours.to_tiktoken()
    t_mine, t_ref = alternate(lambda: mine.encode_ordinary(text), lambda: cl100k.encode_ordinary(text))
    row("to_tiktoken() of cl100k ranks", f"{mb / t_mine:.1f} MB/s", f"{mb / t_ref:.1f} MB/s (tiktoken)",
        f"speed ours/tiktoken {t_ref / t_mine:.2f}")
    ours.cache.clear()
    seconds, _ = timed(lambda: (ours.cache.clear(), ours.encode_ordinary(text)), 3)
    row("pure-Python encode with cl100k ranks", f"{mb / seconds:.2f} MB/s")


SECTIONS = {"tokenizer": bench_tokenizer}

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Print the performance table.")
    ap.add_argument("sections", nargs="*", choices=[[], *SECTIONS], default=[])
    for name in ap.parse_args().sections or SECTIONS:
        SECTIONS[name]()
        sys.stdout.flush()
