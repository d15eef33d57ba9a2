#> L10 chats
"""
data/chats.py -- the chat files every tuning stage reads, and a look at one.

sft.py trains on conversations, align.py on preference pairs, rl.py samples
prompts and eval.py asks questions: all of them JSONL files, one JSON value a
line, read here. A conversation line is {"messages": [{"role", "content"}, ...]}
(the layout of OpenAI's fine-tuning API and of Hugging Face chat datasets) or
an Alpaca line {"instruction", "input", "output"} (Taori et al. 2023),
converted on read. Every line is checked against the template's rules
(tokenizer.check_message) before any training starts, and a bad one is named
with its file and line number.

The built-in sets, data/sft and data/dpo, are made from the story world by
data/prepare.py the first time a stage reads them.

    python data/chats.py data/sft/train.jsonl --index 1   # a chat, its loss mask in colour
"""

import argparse
import functools
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: find tokenizer.py

from tokenizer import BPETokenizer, check_message  # noqa: E402

# -----------------------------------------------------------------------------
# Reading: JSONL lines, conversations, and the built-in sets made on first use


def _alpaca(row):
    """Convert an Alpaca line {"instruction", "input", "output"} (Taori et al. 2023) to
    messages: the instruction and the optional input form the user turn.

    >>> _alpaca({"instruction": "Add.", "input": "2+2", "output": "4"})
    [{'role': 'user', 'content': 'Add.\\n\\n2+2'}, {'role': 'assistant', 'content': '4'}]
    """
    user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]


BUILT_IN = Path(__file__).resolve().parent  # data/sft and data/dpo in here are made for you


def refresh_built_in(folder):
    """The built-in chat sets, this repository's data/sft and data/dpo, are made by
    data/prepare.py from data/storyworld.py: on first use, and again whenever the
    code that writes them has changed since (otherwise a pull with new answer
    wordings trains on the old ones). Any other folder is the user's: left alone."""
    folder = Path(folder).resolve()
    if folder.parent == BUILT_IN.resolve() and folder.name in ("sft", "dpo"):
        _refresh(folder)


@functools.cache  # once per folder and process
def _refresh(folder):
    prepare = Path(__file__).resolve().parent / "prepare.py"
    subprocess.run([sys.executable, str(prepare), folder.name, "--out", str(folder), "--if_stale"], check=True)


def jsonl_rows(path):
    """(line number, value) for each non-blank line of a JSONL file. A line that is not
    JSON fails with the file, its number and the column. subtle: parsed with its
    newline, a line cut short would be reported as json's "line 2, column 1"."""
    if Path(path).is_dir():
        raise ValueError(f"{path} is a folder; give a .jsonl file (e.g. {Path(path) / 'train.jsonl'})")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue  # blank lines, e.g. a trailing one, carry nothing
            try:
                yield n, json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None


def read_conversations(path, tok=None):
    """Every conversation of a JSONL file as a list of messages, checked up front.

    Each line is {"messages": [...]} (the format of OpenAI's fine-tuning API and
    of Hugging Face chat datasets) or an Alpaca line, converted on read. A bad
    line raises ValueError naming the file, the line and the problem, before any
    training starts. Every conversation ends with an assistant message: the
    target in training, the reference answer in eval and RL. With `tok`, the
    result is each conversation rendered, (ids, mask) (what sft.py trains on),
    so special-token text in content is caught with its line number too.
    """
    refresh_built_in(Path(path).parent)
    out = []
    for n, row in jsonl_rows(path):
        try:
            if not isinstance(row, dict):
                raise ValueError(f"expected a JSON object, got {type(row).__name__}")
            if "messages" in row:
                messages = row["messages"]
            elif {"instruction", "output"} <= row.keys():
                messages = _alpaca(row)
            else:
                raise ValueError(f"expected a \"messages\" list or Alpaca keys instruction/input/"
                                 f"output, got keys {sorted(row)}")
            if not isinstance(messages, list) or not messages:
                raise ValueError("\"messages\" must be a non-empty list")
            for i in range(len(messages)):
                check_message(messages, i, False)
            out.append(messages if tok is None else tok.render_conversation(messages))
        except (ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}:{n}: {e}") from None
    if not out:
        raise ValueError(f"{path} holds no conversations")
    return out


def refresh_data_on_rank0(cfg, ddp, master):
    """Under torchrun, rank 0 makes the built-in chat sets (or remakes stale ones:
    refresh_built_in) of every *.jsonl path in cfg while the other ranks wait.
    Every rank writing the same files at once could hand a reader half a file."""
    if ddp:
        import torch.distributed as dist

        if master:
            for path in [v for v in cfg.values() if isinstance(v, str) and v.endswith(".jsonl")]:
                refresh_built_in(Path(path).parent)
        dist.barrier()


# -----------------------------------------------------------------------------
# Looking at one conversation: the tokens, and which of them the loss sees


def show_conversation(tok, messages, color=None):
    """The rendered conversation with the supervised tokens (mask 1) highlighted:
    green on a terminal, [in brackets] otherwise. The picture of the loss mask."""
    color = sys.stdout.isatty() if color is None else color
    ids, mask = tok.render_conversation(messages)
    out, prev = [], 0
    for i, m in zip(ids, mask):
        if m != prev:  # a supervised span opens or closes here
            out.append(("\x1b[42m\x1b[30m" if m else "\x1b[0m") if color else ("[" if m else "]"))
            prev = m
        out.append(tok.decode([i]))
    out.append(("\x1b[0m" if color else "]") if prev else "")
    return f"{''.join(out)}\n{len(ids)} tokens, {sum(mask)} supervised (the loss is computed on these)"


def main(argv=None):
    ap = argparse.ArgumentParser(description="Show a conversation of a chat JSONL file and its loss mask.")
    ap.add_argument("path", help="a chat JSONL file, e.g. data/sft/train.jsonl")
    ap.add_argument("--index", type=int, default=0, help="which conversation (0 = the first)")
    ap.add_argument("--tokenizer", default="data/storyworld/tokenizer.json")
    args = ap.parse_args(argv)
    try:
        tok = BPETokenizer.load(args.tokenizer)
        print(show_conversation(tok, read_conversations(args.path)[args.index]))
    except (ValueError, IndexError, OSError) as e:
        sys.exit(f"data/chats.py: {e}")


if __name__ == "__main__":
    main()
#< L10
