#> L01 tokenizer
"""
tokenizer.py -- from text to token ids and back.

A language model reads integers, not text. This file builds the two tokenizers
the course uses and proves the second one exact against a production tokenizer:

1. CharTokenizer: one id per character. Tiny vocabulary, long sequences.
2. BPETokenizer: byte-level Byte Pair Encoding, as in GPT-2 and GPT-4. Start
   from the 256 byte values (so any string is encodable), split the text with a
   regex into word-like chunks, and repeatedly merge the most frequent adjacent
   pair into a new token. Sennrich et al. 2016 (BPE for NMT), Radford et al.
   2019 (GPT-2: byte-level BPE with regex pre-splitting).

Run it on a CPU:
    python tokenizer.py train --input data.txt --vocab_size 1024 --out out/tok.json
    python tokenizer.py show out/tok.json "Hello world"

Our tokenizer and tiktoken (OpenAI's Rust BPE) are two views of one object:
`to_tiktoken()` hands our merges to tiktoken for bulk encoding, and
`from_tiktoken(enc)` recovers the merges from any tiktoken encoding, so the
pure-Python encoder below can run GPT-4's cl100k_base vocabulary (and the tests
check that it agrees with tiktoken token for token).
"""

import argparse
import heapq
import json
import sys
import time
import unicodedata
from collections import Counter, defaultdict
from itertools import chain

import regex  # the `regex` package (tiktoken depends on it): \p{L} classes, possessives

# The pre-split patterns of GPT-2 (r50k_base) and GPT-4 (cl100k_base), as tiktoken
# defines them. A merge never crosses a chunk boundary, so " dog", "dog." and
# "dog!" share the token " dog" instead of each wasting vocabulary on punctuation.
# GPT-4's version also caps digit runs at 3 and folds case in contractions.
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT4_SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""

#> L10 chat-tokens
# The chat template's structure tokens (lesson 10). A conversation is one token
# stream; these mark where it begins and where each role's turn starts and ends.
# Being special tokens, they are single ids that no user text can spell: encode()
# refuses their text in content, so "<|user_end|>" typed by a user stays letters.
CHAT_TOKENS = [
    "<|bos|>",  # begin of conversation: always the first token, so every chat starts alike
    "<|system_start|>", "<|system_end|>",  # optional instructions for the whole chat
    "<|user_start|>", "<|user_end|>",  # what the person says
    "<|assistant_start|>", "<|assistant_end|>",  # what the model says; _end = stop generating
]
#< L10
NEVER = float("inf")  # the rank of a pair that was never merged
FORMAT_VERSION = 1  # bump when the JSON layout changes; load() refuses other versions


# -----------------------------------------------------------------------------
# The character tokenizer


class Saved:
    """save(path) and load(path) for both tokenizers: state() as one readable JSON file."""

    def save(self, path):
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.state(), f, ensure_ascii=False, indent=0)

    @classmethod
    def load(cls, path):
        return cls.from_state(read_json(path), path)


class CharTokenizer(Saved):
    """Every distinct character of the training text is one token.

    >>> tok = CharTokenizer.train("hello")
    >>> tok.chars, tok.encode("hell"), tok.decode([3, 1])
    ('ehlo', [1, 0, 2, 2], 'oh')
    """

    def __init__(self, chars):
        self.chars = "".join(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def train(cls, text, vocab_size=None):
        return cls(sorted(set(text)))  # sorted: the same text always gives the same ids

    @property
    def vocab_size(self):
        return len(self.chars)

    def encode(self, text):
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:  # a char tokenizer cannot spell what it never saw
            raise ValueError(f"character {e.args[0]!r} is not in this tokenizer's vocabulary "
                             f"of {self.vocab_size}; train it on text that contains it") from None

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)

    def state(self):
        """Everything needed to rebuild the tokenizer, as plain JSON-able values."""
        return {"format": "intro2llm-char", "version": FORMAT_VERSION, "chars": self.chars}

    @classmethod
    def from_state(cls, data, where="tokenizer state"):
        return cls(check_state(data, "intro2llm-char", where)["chars"])


def read_json(path):
    """Parse a tokenizer file; `from_state` then checks that it is ours."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read tokenizer file {path}: {e}; "
                         "retrain it with `python tokenizer.py train`") from None


def check_state(data, kind, where):
    """Refuse a state (from a file or a checkpoint) that is not ours or not this version."""
    kinds = (kind,) if isinstance(kind, str) else kind
    if not isinstance(data, dict) or data.get("format") not in kinds:
        raise ValueError(f"{where} is not a {' or '.join(kinds)} tokenizer file")
    if data.get("version") != FORMAT_VERSION:
        raise ValueError(f"{where} has format version {data.get('version')}, this code reads "
                         f"version {FORMAT_VERSION}; retrain it with `python tokenizer.py train`")
    return data


# -----------------------------------------------------------------------------
# BPE building blocks: counting pairs and merging them


#> L01 pairs-and-merges exercise
def count_pairs(ids, counts=None, weight=1):
    """Add the adjacent pairs of `ids` to `counts`, each `weight` times.

    >>> count_pairs([1, 2, 3, 1, 2])
    {(1, 2): 2, (2, 3): 1, (3, 1): 1}
    """
    counts = {} if counts is None else counts
    for pair in zip(ids, ids[1:]):
        counts[pair] = counts.get(pair, 0) + weight
    return counts


def merge(ids, pair, new_id):
    """Replace every occurrence of `pair` in `ids`, left to right, by `new_id`.

    >>> merge([1, 2, 3, 1, 2], (1, 2), 4)
    [4, 3, 4]
    >>> merge([5, 5, 5], (5, 5), 6)  # subtle: non-overlapping, leftmost first
    [6, 5]
    """
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out
#< L01


def best_pair(counts):
    """The pair to merge next: the most frequent; on a tie, the smallest (a, b).

    The tie rule is ours (minbpe takes the first pair seen); any fixed rule
    works, but the naive and the fast trainer must share it to agree exactly.
    """
    return min(counts, key=lambda p: (-counts[p], p))


# -----------------------------------------------------------------------------
# Training, the naive way: recount every pair after every merge


def train_naive(chunks, num_merges):
    """Reference trainer: O(merges x text). Returns [((a, b), new_id), ...].

    `chunks` are the pre-split pieces of the text as lists of byte ids.
    """
    ids = [list(c) for c in chunks]
    merges = []
    for new_id in range(256, 256 + num_merges):
        counts = {}
        for chunk in ids:
            count_pairs(chunk, counts)
        if not counts:
            break  # every chunk is a single token: nothing left to merge
        pair = best_pair(counts)
        ids = [merge(chunk, pair, new_id) for chunk in ids]
        merges.append((pair, new_id))
    return merges


# -----------------------------------------------------------------------------
# Training, the fast way: the same merges, touching only what changes


#> L01 fast-trainer exercise
def train_fast(chunks, num_merges, progress=None):
    """Same result as train_naive, typically 100x faster. Three ideas:

    1. Count each distinct chunk once, with its frequency: English text has few
       distinct words, so 1 MB of Shakespeare is ~25k chunks, not ~300k.
    2. Keep pair counts and an index pair -> chunks containing it. A merge of
       (a, b) only changes the chunks listed under (a, b): update their pairs.
    3. Find the best pair with a heap of (-count, pair). Counts change all the
       time, so entries go stale; instead of deleting we push the new count and
       skip popped entries whose count no longer matches ("lazy deletion").
    """
    freq = Counter(tuple(c) for c in chunks)
    words = [list(w) for w in freq]  # distinct chunks as lists of ids
    weights = list(freq.values())  # how often each occurs in the text
    counts, where = {}, defaultdict(set)
    for i, w in enumerate(words):
        count_pairs(w, counts, weights[i])
        for pair in zip(w, w[1:]):
            where[pair].add(i)
    heap = [(-c, p) for p, c in counts.items()]
    heapq.heapify(heap)  # ties pop the smallest pair first, exactly as best_pair
    merges = []
    for new_id in range(256, 256 + num_merges):
        while heap and counts.get(heap[0][1]) != -heap[0][0]:
            heapq.heappop(heap)  # stale: this pair's count has changed since the push
        if not heap:
            break
        _, pair = heapq.heappop(heap)
        delta = defaultdict(int)  # net change of each pair's count from this merge
        for i in where.pop(pair):
            w = words[i]
            new = merge(w, pair, new_id)
            if len(new) == len(w):
                continue  # subtle: the index is allowed to list chunks that lost the pair
            for p in zip(w, w[1:]):
                delta[p] -= weights[i]
            for p in zip(new, new[1:]):
                delta[p] += weights[i]
                where[p].add(i)
            words[i] = new
        for p, d in delta.items():
            if d:
                counts[p] = counts.get(p, 0) + d
                if counts[p] > 0:
                    heapq.heappush(heap, (-counts[p], p))
                else:
                    del counts[p]
        merges.append((pair, new_id))
        if progress:
            progress(len(merges), num_merges)
    return merges
#< L01


# -----------------------------------------------------------------------------
# The byte-level BPE tokenizer


class ChunkCache(dict):
    """chunk -> ids. A miss runs BPE once (dict calls __missing__); hits stay in C."""

    def __init__(self, encode_chunk, limit=200_000):
        super().__init__()
        self.encode_chunk, self.limit = encode_chunk, limit

    def __missing__(self, chunk):
        if len(self) >= self.limit:  # bound memory on endless streams of new words
            self.clear()
        ids = self[chunk] = self.encode_chunk(chunk)
        return ids


class BPETokenizer(Saved):
    """Byte-level BPE with regex pre-splitting and special tokens.

    State: `merges` {(a, b): new_id} in learning order, `vocab` {id: bytes},
    `byte_ids` (the id of each of the 256 bytes: the identity for tokenizers
    trained here, a permutation for GPT-2/GPT-4's), and `special_tokens`
    {name: id}, ids after all merges.
    """

    def __init__(self, pattern=GPT4_SPLIT_PATTERN, special_tokens=()):
        self.pattern = pattern
        self.regex = regex.compile(pattern)
        self.byte_ids = list(range(256))
        self.merges = {}
        self.special_names = list(special_tokens)  # registered by name, ids given by train()
        self.special_tokens = {}
        # Two rules some Hugging Face tokenizers add (hf.py's from_hf sets them): Unicode NFC
        # normalisation of the text first (Qwen2/3), and a chunk that is itself a token
        # encodes as that token without merging (Llama 3's "ignore_merges", tiktoken's rule).
        self.nfc = self.ignore_merges = False
        self._build()

    def _build(self):
        """Derive vocab (id -> bytes) from the byte ids and the merges, in order."""
        self.vocab = {i: bytes([b]) for b, i in enumerate(self.byte_ids)}
        for (a, b), i in self.merges.items():
            self.vocab[i] = self.vocab[a] + self.vocab[b]
        encode = self._encode_chunk
        if self.ignore_merges:  # bytes -> id of every ordinary token (specials are not text)
            whole = {self.vocab[i]: i for i in self.vocab}
            encode = lambda chunk: [whole[b]] if (b := chunk.encode("utf-8")) in whole else self._encode_chunk(chunk)
        for name, i in self.special_tokens.items():
            self.vocab[i] = name.encode("utf-8")
        self.cache = ChunkCache(encode)  # chunk -> ids, filled on first use

    @property
    def vocab_size(self):
        return max(self.vocab) + 1

    def split(self, text):
        """Pre-split text into chunks that merges never cross.

        >>> BPETokenizer().split("Hello world!!! 123456")
        ['Hello', ' world', '!!!', ' ', '123', '456']
        """
        return self.regex.findall(text)

    # ---- training --------------------------------------------------------

    def train(self, text, vocab_size, verbose=False, naive=False):
        """Learn vocab_size - 256 - len(specials) merges from `text`."""
        num_merges = vocab_size - 256 - len(self.special_names)
        if num_merges < 0:
            raise ValueError(f"vocab_size {vocab_size} is too small: it must hold the 256 byte "
                             f"tokens and {len(self.special_names)} special tokens")
        chunks = [ch.encode("utf-8") for ch in self.split(text)]
        t0 = time.time()

        def progress(done, total):  # merges/s and an ETA on one rewritten line
            if verbose and (done % 100 == 0 or done == total):
                rate = done / (time.time() - t0)
                print(f"\rmerge {done}/{total}  {rate:,.0f} merges/s  ETA {(total - done) / rate:.0f}s",
                      end="", file=sys.stderr, flush=True)

        merges = train_naive(chunks, num_merges) if naive else train_fast(chunks, num_merges, progress)
        if verbose:
            print(file=sys.stderr)
        self.merges = dict(merges)
        first_free = 256 + len(merges)  # fewer merges than asked if the text ran out of pairs
        self.special_tokens = {n: first_free + k for k, n in enumerate(self.special_names)}
        self._build()
        return self

    # ---- encoding ----------------------------------------------------------

    #> L01 encode-chunk exercise
    def _encode_chunk(self, chunk):
        """BPE on one chunk: apply the earliest-learned merge present, until none applies.

        Merges must replay in training order: the pair with the lowest new id
        goes first (e.g. with merges (h,e)->256 then (he,l)->257 "hel" becomes
        [257]; applying them in another order could leave "h" + "el").
        """
        ids = [self.byte_ids[b] for b in chunk.encode("utf-8")]
        rank = self.merges.get  # a pair's new id doubles as its rank: lower = learned earlier
        while len(ids) >= 2:
            ranks = [rank(p, NEVER) for p in zip(ids, ids[1:])]
            first = min(ranks)
            if first == NEVER:
                break  # no adjacent pair was ever merged: done
            k = ranks.index(first)  # merge the leftmost occurrence; a later one, if
            ids[k:k + 2] = [first]  # any, has the same rank and goes next iteration
        return ids
    #< L01

    def encode_ordinary(self, text):
        """Encode text, treating special-token strings as plain text.

        Text repeats its words, so each distinct chunk is encoded once and then
        served from `self.cache`: on Tiny Shakespeare 263k chunks are 15k distinct.
        """
        if self.nfc:  # "é" typed as e + U+0301 becomes the single character U+00E9
            text = unicodedata.normalize("NFC", text)
        return list(chain.from_iterable(map(self.cache.__getitem__, self.split(text))))

    def encode(self, text, allowed_special=frozenset(), disallowed_special="all"):
        """Encode text with tiktoken's rules for special tokens.

        allowed_special: names encoded as their special id ("all" for every one).
        disallowed_special: names that raise if they occur in the text ("all":
        every special not allowed). Those in neither set are plain text. The
        default raises, because a user's text that smuggles "<|endoftext|>" in
        could otherwise end a document early.
        """
        specials = set(self.special_tokens)
        allowed = specials if allowed_special == "all" else set(allowed_special)
        disallowed = specials - allowed if disallowed_special == "all" else set(disallowed_special)
        if unknown := (allowed | disallowed) - specials:
            raise ValueError(f"unknown special tokens {sorted(unknown)}; registered: {sorted(specials)}")
        for name in disallowed:
            if name in text:
                raise ValueError(f"text contains the special token {name!r}; pass "
                                 f"allowed_special={{{name!r}}} to encode it as a special token, "
                                 f"or disallowed_special=() to encode it as plain text")
        if not allowed:
            return self.encode_ordinary(text)
        # Split around the allowed specials, keeping them: "a<|x|>b" -> ["a", "<|x|>", "b"].
        parts = regex.split("(" + "|".join(regex.escape(s) for s in sorted(allowed)) + ")", text)
        ids = []
        for k, part in enumerate(parts):  # odd positions hold the separators, i.e. the specials
            ids.extend([self.special_tokens[part]] if k % 2 else self.encode_ordinary(part))
        return ids

    def decode_bytes(self, ids):
        try:
            return b"".join(self.vocab[i] for i in ids)
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]} is out of range for a vocabulary of "
                             f"{self.vocab_size}") from None

    def decode(self, ids):
        """ids -> str. A token may hold half of a UTF-8 character: bytes that do not
        form a whole character decode to U+FFFD instead of raising."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # ---- tiktoken interop ------------------------------------------------

    def to_tiktoken(self, name="intro2llm"):
        """The same tokenizer as a tiktoken.Encoding (Rust): same ids, ~10x faster."""
        import tiktoken

        ranks = {self.vocab[i]: i for i in [*self.byte_ids, *self.merges.values()]}
        return tiktoken.Encoding(name, pat_str=self.pattern, mergeable_ranks=ranks,
                                 special_tokens=dict(self.special_tokens))

    @classmethod
    def from_tiktoken(cls, enc):
        """Recover merges from a tiktoken encoding, which stores only ranks {bytes: id}.

        tiktoken encodes by merging, at each step, the adjacent pair whose
        concatenation has the lowest rank. So the merge that created token t is
        what that procedure leaves when run on t's own bytes with only the ranks
        below t's: exactly two parts, the pair (a, b) -> t.
        """
        ranks = {}
        for i in range(enc.n_vocab):
            try:
                ranks[enc.decode_single_token_bytes(i)] = i
            except KeyError:
                pass  # ids reserved for specials, or holes in the numbering
        specials = {s: enc.encode_single_token(s) for s in enc.special_tokens_set}
        for s in specials:
            ranks.pop(s.encode("utf-8"), None)
        tok = cls(enc._pat_str)  # subtle: tiktoken has no public name for its pattern
        tok.byte_ids = [ranks[bytes([b])] for b in range(256)]
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            if len(token) > 1:
                a, b = _bpe_parts(token, ranks, rank)
                tok.merges[ranks[a], ranks[b]] = rank
        tok.special_names = sorted(specials, key=specials.get)
        tok.special_tokens = specials
        tok._build()
        return tok

    #> L10 template exercise
    # ---- the chat template (lesson 10) -------------------------------------

    # Which special tokens this template writes (a base model needs their embedding
    # rows; LoRA's lora_tokens="chat" trains exactly these) and which one ends a reply.
    # hf.py's HFTokenizer renders Qwen3's or Llama 3's template and overrides both, so
    # the stages ask the tokenizer, never this file.
    template_tokens = CHAT_TOKENS
    template_end = "<|assistant_end|>"

    def render_conversation(self, messages, for_completion=False):
        """A conversation -> (ids, mask): the token stream and which tokens to learn.

        messages: [{"role": "system"|"user"|"assistant", "content": str}, ...],
        an optional system message first, then user and assistant alternating.
        The layout, one line per turn (spaces here only for reading):

            <|bos|> <|system_start|> Be brief. <|system_end|>
            <|user_start|> 2+2? <|user_end|>
            <|assistant_start|> 4 <|assistant_end|>       mask 1 on "4 <|assistant_end|>"

        mask[i] = 1 exactly where ids[i] is something the model must learn to
        say: each assistant turn's content and its end token (so it learns when
        to stop). Everything else -- structure, system, user -- is context.
        for_completion=True renders the prompt for generating the next reply: the
        last message must be the user's, and the stream ends with
        <|assistant_start|>, where the model takes over.

        Content is encoded with every special token disallowed: a user who
        types "<|user_end|>" gets an error, never a structure token.
        """
        if missing := [t for t in CHAT_TOKENS if t not in self.special_tokens]:
            raise ValueError(f"this tokenizer has no chat tokens {missing}: rebuild it with "
                             "`python data/prepare.py storyworld` (it reserves them) and pretrain again")
        if not messages:
            raise ValueError("a conversation needs at least one message")
        sp = self.special_tokens
        ids, mask = [sp["<|bos|>"]], [0]
        for i, msg in enumerate(messages):
            role, content = check_message(messages, i, for_completion)
            try:  # subtle: the default disallowed_special="all" is what keeps text out of structure
                body = self.encode(content)
            except ValueError as e:
                raise ValueError(f"message {i} ({role}): {e}") from None
            learn = int(role == "assistant")
            ids += [sp[f"<|{role}_start|>"], *body, sp[f"<|{role}_end|>"]]
            # The start token is a given (we put it there); the content and the end token
            # are the reply the model must produce, ending included.
            mask += [0] + [learn] * (len(body) + 1)
        if for_completion:
            ids.append(sp["<|assistant_start|>"])
            mask.append(0)
        return ids, mask
    #< L10

    # ---- saving and inspecting -------------------------------------------

    def state(self):
        """Plain lists, dicts, ints and strings: a JSON file's content, and also what a
        checkpoint stores, since torch.load(weights_only=True) accepts exactly these.
        Merges in learning order as [a, b, new_id]."""
        return {"format": "intro2llm-bpe", "version": FORMAT_VERSION, "pattern": self.pattern,
                "byte_ids": self.byte_ids, "special_tokens": self.special_tokens,
                "merges": [[a, b, i] for (a, b), i in self.merges.items()],
                **{k: True for k in ("nfc", "ignore_merges") if getattr(self, k)}}

    @classmethod
    def from_state(cls, data, where="tokenizer state"):
        data = check_state(data, "intro2llm-bpe", where)
        try:
            tok = cls(data["pattern"], data["special_tokens"])
            tok.byte_ids = list(data["byte_ids"])
            tok.merges = {(a, b): i for a, b, i in data["merges"]}
            tok.special_tokens = dict(data["special_tokens"])
            tok.nfc, tok.ignore_merges = data.get("nfc", False), data.get("ignore_merges", False)
            tok._build()
        except (KeyError, TypeError, ValueError, regex.error) as e:
            raise ValueError(f"{where} is damaged ({type(e).__name__}: {e}); "
                             "retrain it with `python tokenizer.py train`") from None
        return tok

    def describe(self, i):
        """One line of the vocab dump: "   300  [ t][he] -> ' the'"."""
        # repr without its quotes: "\n" stays visible; half a UTF-8 character shows as U+FFFD
        show = lambda j: repr(self.vocab[j].decode("utf-8", errors="replace"))[1:-1]
        pair = next(((a, b) for (a, b), j in self.merges.items() if j == i), None)
        parts = f"[{show(pair[0])}][{show(pair[1])}] -> " if pair else ""
        return f"{i:6d}  {parts}'{show(i)}'"


def _bpe_parts(token, ranks, max_rank):
    """tiktoken's merge loop on `token`'s bytes using only ranks below max_rank."""
    parts = [bytes([b]) for b in token]
    while True:
        best = None
        for k in range(len(parts) - 1):
            r = ranks.get(parts[k] + parts[k + 1])
            if r is not None and r < max_rank and (best is None or r < best[0]):
                best = (r, k)
        if best is None:
            break
        k = best[1]
        parts[k:k + 2] = [parts[k] + parts[k + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} is not one merge of two earlier tokens")
    return parts


#> L10 conversations
# -----------------------------------------------------------------------------
# The template's rules for a conversation (data/chats.py checks whole files with them)


def check_message(messages, i, for_completion):
    """(role, content) of messages[i], or a ValueError saying what breaks the template:
    system only first, then user, assistant, user, ... ending where the use needs it."""
    msg, role_of = messages[i], lambda m: m.get("role") if isinstance(m, dict) else None
    if not isinstance(msg, dict) or not isinstance(msg.get("content"), str):
        raise ValueError(f"message {i} must be {{\"role\": ..., \"content\": \"text\"}}, got {msg!r}")
    role = msg.get("role")
    if role not in ("system", "user", "assistant"):
        raise ValueError(f"message {i} has unknown role {role!r}; use system, user or assistant")
    first = 1 if role_of(messages[0]) == "system" else 0  # index of the first user turn
    expected = "system" if i < first else ("user", "assistant")[(i - first) % 2]
    if role != expected:
        raise ValueError(f"message {i} is {role!r} where {expected!r} was expected: a conversation "
                         "is an optional system message, then user and assistant turns alternating")
    if i == len(messages) - 1 and role != ("user" if for_completion else "assistant"):
        raise ValueError("a conversation to generate from must end with a user message" if for_completion
                         else "a training conversation must end with an assistant message")
    return role, msg["content"]
#< L10


# -----------------------------------------------------------------------------
# Command line: train a tokenizer, look at how it splits text


def show(tok, text, color=None):
    """Token boundaries in alternating colours (or [brackets] off a terminal), then the ids."""
    color = sys.stdout.isatty() if color is None else color
    ids = tok.encode(text, allowed_special="all")
    pieces = [tok.decode([i]) for i in ids]
    if color:
        bg = ["\x1b[48;5;153m", "\x1b[48;5;223m", "\x1b[48;5;194m", "\x1b[48;5;224m"]
        line = "".join(f"{bg[k % 4]}\x1b[30m{p}\x1b[0m" for k, p in enumerate(pieces))
    else:
        line = "".join(f"[{p}]" for p in pieces)
    return f"{line}\n{len(ids)} tokens: {ids}"


def main(argv=None):
    ap = argparse.ArgumentParser(description="Train or inspect a byte-level BPE tokenizer.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="learn merges from a text file")
    tr.add_argument("--input", required=True)
    tr.add_argument("--vocab_size", type=int, default=1024)
    tr.add_argument("--out", required=True, help="JSON path; a .vocab dump is written beside it")
    tr.add_argument("--pattern", choices=["gpt2", "gpt4"], default="gpt4")
    tr.add_argument("--special", nargs="*", default=["<|endoftext|>"])
    sh = sub.add_parser("show", help="show how a saved tokenizer splits some text")
    sh.add_argument("path")
    sh.add_argument("text")
    args = ap.parse_args(argv)

    if args.cmd == "show":
        print(show(BPETokenizer.load(args.path), args.text))
        return
    with open(args.input, encoding="utf-8") as f:
        text = f.read()
    pattern = GPT2_SPLIT_PATTERN if args.pattern == "gpt2" else GPT4_SPLIT_PATTERN
    t0 = time.time()
    tok = BPETokenizer(pattern, args.special).train(text, args.vocab_size, verbose=True)
    print(f"trained {len(tok.merges)} merges on {len(text):,} characters in {time.time() - t0:.1f}s")
    tok.save(args.out)
    with open(args.out.rsplit(".", 1)[0] + ".vocab", "w", encoding="utf-8") as f:
        f.write("\n".join(tok.describe(i) for i in sorted(tok.vocab)) + "\n")
    print("first merges:\n" + "\n".join(tok.describe(i) for i in list(tok.merges.values())[:10]))
    print(f"saved {args.out} (and the readable .vocab beside it)")


if __name__ == "__main__":
    main()
#< L01
