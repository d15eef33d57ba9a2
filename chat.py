#> L09 chat
"""
chat.py -- talk to a checkpoint; tokens are printed as they are generated.

    python chat.py out/tiny            # a base model: type the start, it continues
    echo "Once upon a time" | python chat.py out/tiny
    python chat.py ~/models/Qwen3-0.6B --dtype bfloat16   # a downloaded Hugging Face folder

Commands: /temp 0.8 (0 = greedy), /topk 50, /topp 0.9, /len 200, /reset, and
Ctrl-D (end of input) to quit. Lesson 10 adds a chat mode for models tuned
with the chat template; until then every checkpoint is completed as text.
"""

import argparse
import sys

import torch

from run import load_run, stream_text


def command(line, settings):
    """Apply a /command to the sampling settings; returns the message to print."""
    name, _, value = line[1:].partition(" ")
    # Each sampling setting and the type its value must parse as; "/topk" alone turns it off.
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


#> L10 chat-mode
def chat_command(name, value, chat):
    """/system TEXT, /history, /reset on chat = {"system": str, "history": [messages]}."""
    if name == "system":
        chat["system"] = value.strip()
        return f"system message set to {chat['system']!r}" if chat["system"] else "system message cleared"
    if name == "reset":
        chat["history"] = []
        return "history cleared"
    turns = ([f"system: {chat['system']}"] if chat["system"] else []) + \
        [f"{m['role']}: {m['content']}" for m in chat["history"]]
    return "\n".join(turns) or "(no turns yet)"


def fit_context(tok, chat, block_size, room):
    """Drop the oldest whole turns (a user message and its reply) until the rendered
    conversation plus `room` tokens for the reply fits block_size; returns the
    messages to render. The system message stays. Raises, dropping nothing, if the
    new message cannot fit even alone."""
    system = [{"role": "system", "content": chat["system"]}] if chat["system"] else []
    alone, _ = tok.render_conversation(system + chat["history"][-1:], for_completion=True)
    if len(alone) + room > block_size:  # check first: never lose the history for nothing
        raise ValueError(f"that message is {len(alone)} tokens; with {room} for the reply the "
                         f"model's context of {block_size} cannot hold it")
    while len(tok.render_conversation(system + chat["history"], for_completion=True)[0]) + room > block_size:
        # subtle: two messages at a time, a question and its answer, so that the history
        # still starts with a user turn and alternates, as render_conversation demands.
        chat["history"] = chat["history"][2:]
        print(f"(dropped the oldest turn to fit the {block_size}-token context)", flush=True)
    return system + chat["history"]


def chat_loop(model, tok, settings, generator, interactive):
    """Chat mode (lesson 10): a checkpoint from sft.py, align.py or rl.py opens a chat.

        python chat.py out/sft

    Each line you type is a user turn; the whole conversation is rendered with
    the template and the reply streams until <|assistant_end|>. /system TEXT sets
    a system message (/system alone clears it), /history shows the turns, /reset
    forgets them. When the conversation outgrows the model's block_size, the
    oldest whole turns (a question with its answer) are dropped. Returns at the
    end of input.
    """
    from run import chat_stream  # lesson 10's: imported here, where chat mode begins
    # The model has no memory between calls: the "conversation" is this list, rendered
    # anew for every reply, so /reset and trimming are just edits to a Python list.
    chat = {"system": "", "history": []}
    # Answers here are facts from a story: greedy is the right default (/temp 0.8 to vary).
    settings["temp"] = 0.0
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            print()
            return
        line = line.rstrip("\n")
        if line.startswith("/"):
            name, _, value = line[1:].partition(" ")  # the chat's own commands first
            print(chat_command(name, value, chat) if name in ("system", "history", "reset")
                  else command(line, settings), flush=True)
            continue
        if not line.strip():
            continue
        # One line is one turn, so a typed "\\n" stands for a line break (a story's paragraphs).
        chat["history"].append({"role": "user", "content": line.replace("\\n", "\n")})
        room = min(settings["len"], model.cfg.block_size // 4)  # tokens kept free for the reply
        try:
            messages = fit_context(tok, chat, model.cfg.block_size, room)
        except ValueError as e:  # special-token text in the message, or a message too long
            chat["history"] = chat["history"][:-1]
            print(f"cannot send that: {e}", flush=True)
            continue
        print("assistant> " if interactive else "", end="", flush=True)
        reply = ""
        for piece in chat_stream(model, tok, messages, settings["len"], settings["temp"],
                                 settings["topk"], settings["topp"], generator):
            print(piece, end="", flush=True)
            reply += piece
        print(flush=True)
        # The reply joins the history as the model said it: the next turn is rendered with
        # it, exactly as training rendered a multi-turn conversation.
        chat["history"].append({"role": "assistant", "content": reply})
#< L10


def main(argv=None):
    ap = argparse.ArgumentParser(description="Stream completions from a checkpoint.")
    ap.add_argument("ckpt", nargs="?", default="out/tiny", help="run folder or ckpt.pt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="bfloat16: half the memory, and faster on CPUs with avx512_bf16")
    #> L10 hf-run
    ap.add_argument("--think", action="store_true", help="Qwen3: let it reason (<think>) before answering")
    #< L10
    args = ap.parse_args(argv)
    # Decoding one token reads every weight once, so its speed is set by memory traffic:
    # bf16 weights halve the bytes per token (and the RAM a 0.6B model needs).
    try:
        model, tok, ckpt = load_run(args.ckpt, dtype=getattr(torch, args.dtype))
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
        sys.exit(f"chat.py: cannot load {args.ckpt}: {e}")
    # Sampling settings the /commands change. temp 0.8 with top-k 50 is a common default:
    # varied but rarely incoherent; /temp 0 gives the single most likely continuation.
    settings = {"temp": 0.8, "topk": 50, "topp": None, "len": 200}
    # One generator for the whole session: --seed makes a conversation reproducible.
    generator = torch.Generator().manual_seed(args.seed)
    # A terminal gets a prompt sign; a pipe (tests, scripts) gets only the answers.
    interactive = sys.stdin.isatty()
    #> L10 chat-mode
    if getattr(tok, "chat_format", None):  # Qwen3's switch: thinking on drops the empty <think> block
        tok.chat_format["thinking"] = args.think
    if ckpt.get("chat"):  # tuned with the chat template: talk, do not complete
        print(f"{model.num_params():,}-parameter chat model from {args.ckpt}. One line per turn "
              "(type \\n for a line break); /system TEXT, /history, /reset; Ctrl-D quits.")
        return chat_loop(model, tok, settings, generator, interactive)
    #< L10
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
        # Completion mode keeps no history: every line is a fresh prompt, continued alone.
        try:
            ids = tok.encode(line)
        except ValueError as e:  # a character tokenizer meets a character it never saw
            print(f"cannot encode that: {e}", flush=True)
            continue
        # Echo the beginning, then print each piece the moment it is decoded: flush, or
        # the terminal would hold the text in its buffer until the whole answer is done.
        print(line, end="", flush=True)
        # A base model was trained on documents ending in <|endoftext|>: when it writes one, the
        # story is over and so is the reply (a character tokenizer has no such token: None).
        eot = getattr(tok, "special_tokens", {}).get("<|endoftext|>")
        for piece in stream_text(model, tok, ids, settings["len"], eot, (), settings["temp"], settings["topk"],
                                 settings["topp"], generator):
            print(piece, end="", flush=True)
        print(flush=True)


if __name__ == "__main__":
    main()
#< L09
