#> L09 chat
"""
chat.py -- talk to a checkpoint; tokens are printed as they are generated.

    python chat.py out/tiny            # a base model: type the start, it continues
    echo "Once upon a time" | python chat.py out/tiny

Commands: /temp 0.8 (0 = greedy), /topk 50, /topp 0.9, /len 200, /reset, and
Ctrl-D (end of input) to quit. Lesson 10 adds a chat mode for models tuned
with the chat template; until then every checkpoint is completed as text.
"""

import argparse
import sys

import torch

from model import load_run
from tokenizer import decode_stream


def stream_text(model, tok, ids, settings, generator):
    """Yield text pieces of the continuation of `ids` as tokens arrive."""
    eot = getattr(tok, "special_tokens", {}).get("<|endoftext|>")
    tokens = model.stream(torch.tensor([ids[-model.cfg.block_size:]]), settings["len"],
                          temperature=settings["temp"], top_k=settings["topk"],
                          top_p=settings["topp"], eos_id=eot, generator=generator)
    return decode_stream(tok, tokens, stop_ids={eot})


def command(line, settings):
    """Apply a /command to settings; returns the message to print."""
    name, _, value = line[1:].partition(" ")
    keys = {"temp": float, "topk": int, "topp": float, "len": int}
    if name == "reset":
        return "history cleared"
    if name not in keys:
        return f"unknown command /{name}; try /temp 0.8, /topk 50, /topp 0.9, /len 200, /reset"
    try:
        settings[name] = keys[name](value) if value.strip() else None
    except ValueError:
        return f"/{name} needs a number, got {value!r}"
    return f"{name} set to {settings[name]}"


def main(argv=None):
    ap = argparse.ArgumentParser(description="Stream completions from a checkpoint.")
    ap.add_argument("ckpt", nargs="?", default="out/tiny", help="run folder or ckpt.pt")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        model, tok, ckpt = load_run(args.ckpt)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
        sys.exit(f"chat.py: cannot load {args.ckpt}: {e}")
    # Sampling settings the /commands change. temp 0.8 with top-k 50 is a common default:
    # varied but rarely incoherent; /temp 0 gives the single most likely continuation.
    settings = {"temp": 0.8, "topk": 50, "topp": None, "len": 200}
    # One generator for the whole session: --seed makes a conversation reproducible.
    generator = torch.Generator().manual_seed(args.seed)
    # A terminal gets a prompt sign; a pipe (tests, scripts) gets only the answers.
    interactive = sys.stdin.isatty()
    print(f"{model.num_params():,}-parameter model from {args.ckpt}. Type a beginning; Ctrl-D quits.")
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:  # Ctrl-D or the end of piped input
            print()
            return
        line = line.rstrip("\n")
        if line.startswith("/"):
            print(command(line, settings), flush=True)
            continue
        if not line.strip():
            continue
        try:
            ids = tok.encode(line)
        except ValueError as e:  # a character tokenizer meets a character it never saw
            print(f"cannot encode that: {e}", flush=True)
            continue
        # Echo the beginning, then print each piece the moment it is decoded: flush, or
        # the terminal would hold the text in its buffer until the whole answer is done.
        print(line, end="", flush=True)
        for piece in stream_text(model, tok, ids, settings, generator):
            print(piece, end="", flush=True)
        print(flush=True)


if __name__ == "__main__":
    main()
#< L09
