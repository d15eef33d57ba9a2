"""
lessons.py -- cut the course's lessons out of main.

main holds the finished code. Markers in its files say which lesson each line
belongs to, and this script turns them into one git tag per lesson:

    python lessons.py build            # tags lesson01..lessonNN (+ lessonNN-ex)
    python lessons.py check            # markers valid, every lesson parses
    python lessons.py test 3 7         # run each lesson's own tests in a tmp dir
    python lessons.py test 3 --exercise   # the lesson-03 exercise must fail its tests
    python lessons.py report           # run the course's chain, write report/report.md

Markers (Markdown files wrap the same text in <!-- -->):
    `#> L07 slug`           lines until `#< L07` exist from lesson 7 on
    `#> L03-L06 slug`       each line inside is `#| code`; the code exists in
                            lessons 3..6 only (replaced in 7), inert in main
    `#> L07 slug exercise`  in lesson07-ex, the functions inside keep their
                            signature and docstring and raise NotImplementedError
Lessons and their titles come from the `## Lesson NN — Title` headings of
lessons.md. Tags are built with git plumbing only (hash-object, a temporary
index, write-tree, commit-tree, update-ref), with a fixed author and date so a
rebuild of the same main gives the same SHAs; the work tree, the index, HEAD
and the branches are never touched.
"""

import ast
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

# -----------------------------------------------------------------------------
# Markers

# One regex reads all three marker kinds once the comment syntax is peeled off.
# An open is `#> L07 slug` or `#> L03-L06 slug`, optionally ending in `exercise`.
OPEN = re.compile(r"#> L(\d\d)(?:-L(\d\d))? ([\w.-]+)( exercise)?$")
CLOSE = re.compile(r"#< L(\d\d(?:-L\d\d)?)$")
HTML = re.compile(r"<!--\s*(#[<>|].*?)\s*-->$")  # Markdown: <!-- #> L07 slug -->
TITLE = re.compile(r"^#+ Lesson (\d\d)\s*[—-]+\s*(.+?)\s*$", re.M)


class MarkerError(Exception):
    pass


@dataclass
class Block:
    first: int  # the lesson that adds these lines
    last: int | None  # ranged blocks: the last lesson that still has them
    slug: str
    exercise: bool
    label: str  # "07" or "03-L06": what the closing marker must repeat

    def active(self, n):
        return self.first <= n and (self.last is None or n <= self.last)


def marker_text(path, line):
    """The marker inside `line` ('#> L07 x', '#< L07', '#| code'), or None."""
    s = line.strip()
    if path.endswith(".md"):
        m = HTML.match(s)
        return m.group(1) if m else None
    return s if s[:2] in ("#>", "#<", "#|") else None


def parse(path, text, known):
    """Split a file into (kind, payload, lineno) items, validating as we go.

    kind is "line" (ordinary text), "open" (a Block), "close" or "ranged" (the
    text after `#| `, re-indented). Every error names the file, line and fix.
    """
    items, stack = [], []
    for no, line in enumerate(text.split("\n"), 1):
        where = f"{path}:{no}"
        mark = marker_text(path, line)
        inside_ranged = stack and stack[-1].last is not None
        if mark is None:
            if inside_ranged and line.strip():
                raise MarkerError(f"{where}: a ranged block holds only `#| code` lines; "
                                  "prefix this line with `#| ` or close the block first")
            items.append(("line", line, no))
        elif mark.startswith("#|"):
            if not inside_ranged:
                raise MarkerError(f"{where}: `#|` line outside a ranged block "
                                  "(`#> L03-L06 slug`); wrap it or remove the `#|`")
            indent = line[: len(line) - len(line.lstrip())]
            items.append(("ranged", indent + mark[3:], no))  # `#| x` -> `x`
        elif m := OPEN.match(mark):
            first, last = int(m[1]), int(m[2]) if m[2] else None
            for n in (first, last):
                if n is not None and n not in known:
                    raise MarkerError(f"{where}: lesson {n:02d} is not in lessons.md "
                                      f"(known: {min(known):02d}..{max(known):02d})")
            if last is not None and not first < last < max(known):
                raise MarkerError(f"{where}: ranged block L{first:02d}-L{last:02d} must end "
                                  f"before the last lesson; use `#> L{first:02d}` if it never ends")
            if inside_ranged:
                raise MarkerError(f"{where}: blocks cannot nest inside a ranged block")
            if stack and first < stack[-1].first:
                raise MarkerError(f"{where}: L{first:02d} nested inside L{stack[-1].first:02d}; "
                                  "an inner block's lesson must be >= its outer one")
            label = m[1] + (f"-L{m[2]}" if m[2] else "")
            stack.append(Block(first, last, m[3], bool(m[4]), label))
            items.append(("open", stack[-1], no))
        elif m := CLOSE.match(mark):
            if not stack or stack[-1].label != m[1]:
                want = f"`#< L{stack[-1].label}`" if stack else "no close (nothing is open)"
                raise MarkerError(f"{where}: `{mark}` does not match; expected {want}")
            stack.pop()
            items.append(("close", None, no))
        else:
            raise MarkerError(f"{where}: malformed marker `{mark}`; write "
                              "`#> L07 slug [exercise]`, `#> L03-L06 slug`, `#< L07` or `#| code`")
    if stack:
        raise MarkerError(f"{path}: block `#> L{stack[-1].label} {stack[-1].slug}` is never "
                          f"closed; add `#< L{stack[-1].label}` where it ends")
    return items


def tidy(path, lines):
    """Join lines, collapsing blank runs (2 in code, 1 in Markdown) left by cut blocks."""
    keep, blank, most = [], 0, 1 if path.endswith(".md") else 2
    for line in lines:
        blank = blank + 1 if not line.strip() else 0
        if blank <= most:
            keep.append(line)
    text = "\n".join(keep).strip("\n")
    return text + "\n" if text.strip() else ""


# -----------------------------------------------------------------------------
# Rendering one file for one lesson


def render(path, text, n, known, exercise=False):
    """Text of `path` in lesson n ("" when the file does not exist yet).

    With exercise=True, functions in lesson n's exercise blocks become stubs.
    """
    out, stack, spans = [], [], []  # spans: [start, end) of lesson-n exercise lines
    for kind, payload, _ in parse(path, text, known):
        # A line is in lesson n when every block around it is: nesting only narrows.
        # Marker lines themselves never reach the output.
        visible = all(b.active(n) for b in stack)
        if kind == "open":
            stack.append(payload)
            if visible and payload.exercise and payload.first == n:
                spans.append([len(out), None])
        elif kind == "close":
            block = stack.pop()
            if visible and block.exercise and block.first == n:
                spans[-1][1] = len(out)
        elif visible:
            out.append(payload)
    # Stubs are cut from the rendered lesson, not from main: line numbers and the
    # syntax tree must be those of the file the learner will open.
    if exercise and spans and path.endswith(".py"):
        out = stub(path, out, spans, n)
    return tidy(path, out)


def stub(path, lines, spans, n):
    """Blank the lesson-n exercise code in `lines` (spans are 0-based [start, end)).

    A function defined in a span keeps its decorators, signature and docstring;
    its body becomes one `raise NotImplementedError("lesson NN: ...")`. A span
    inside a function that defines nothing becomes that raise on its own.
    """
    funcs = []  # (qualified name, node) in source order, outer before inner

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            name = getattr(child, "name", None)
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                funcs.append((prefix + name, child))
            walk(child, prefix + name + "." if name else prefix)

    walk(ast.parse("\n".join(lines), path), "")  # subtle: parse once, before any edit
    edits = []  # (first, last, new lines), 1-based inclusive like ast's line numbers

    def raising(indent, what):
        return [f'{indent}raise NotImplementedError("lesson {n:02d}: implement {what}")']

    for s, e in spans:
        defs = [(q, f) for q, f in funcs if s < f.lineno <= e]
        for q, f in defs:
            if any(g.lineno < f.lineno <= g.end_lineno for _, g in defs):
                continue  # nested in a function we blank anyway
            if f.body[0].lineno == f.lineno:
                raise MarkerError(f"{path}: exercise function {q} needs its body on its own lines")
            doc = isinstance(f.body[0], ast.Expr) and isinstance(f.body[0].value, ast.Constant)
            start = f.body[0].end_lineno + 1 if doc else f.body[0].lineno
            edits.append((start, f.end_lineno, raising(" " * f.body[0].col_offset, q)))
        hosts = [(q, f) for q, f in funcs if f.lineno <= s and e <= f.end_lineno]
        code = [line for line in lines[s:e] if line.strip()]
        if not defs and hosts and code:  # statements inside the innermost host function
            indent = code[0][: len(code[0]) - len(code[0].lstrip())]
            edits.append((s + 1, e, raising(indent, f"this part of {hosts[-1][0]}")))
    for first, last, new in sorted(edits, reverse=True):  # bottom-up keeps numbers valid
        lines[first - 1:last] = new
    return lines


# -----------------------------------------------------------------------------
# Reading main, rendering the whole tree


def git(repo, *args, data=None, env=None):
    res = subprocess.run(["git", "-C", str(repo), *args], input=data, capture_output=True,
                         env={**os.environ, **(env or {})})
    if res.returncode:
        raise SystemExit(f"git {' '.join(args)} failed: {res.stderr.decode().strip()}")
    return res.stdout


def read_tree(repo, worktree=False):
    """{path: (mode, bytes)} of refs/heads/main, or of the work tree (tracked + new)."""
    if worktree:
        files = {}
        for p in git(repo, "ls-files", "-z", "-co", "--exclude-standard").decode().split("\0"):
            f = Path(repo, p)
            if p and f.is_file():
                files[p] = ("100755" if os.access(f, os.X_OK) else "100644", f.read_bytes())
        return files
    listing = git(repo, "ls-tree", "-r", "-z", "refs/heads/main").decode().split("\0")
    entries = [e.split("\t", 1) for e in listing if e]
    shas = "".join(meta.split()[2] + "\n" for meta, _ in entries).encode()
    blob, files = git(repo, "cat-file", "--batch", data=shas), {}
    for meta, path in entries:  # --batch answers "<sha> blob <size>\n<bytes>\n" per object
        head, blob = blob.split(b"\n", 1)
        size = int(head.split()[2])
        files[path], blob = (meta.split()[0], blob[:size]), blob[size + 1:]
    return files


def lessons_of(files):
    """{number: title} from the `## Lesson NN — Title` headings of lessons.md."""
    if "lessons.md" not in files:
        raise SystemExit("lessons.md is missing: it lists the lessons (## Lesson 01 — Title)")
    return {int(n): t for n, t in TITLE.findall(files["lessons.md"][1].decode())}


def render_tree(files, n, known, exercise=False):
    """The whole snapshot of lesson n: {path: (mode, bytes)}; empty files are dropped."""
    snap = {}
    for path, (mode, data) in files.items():
        try:
            text = data.decode()
        except UnicodeDecodeError:  # binary files have no markers
            snap[path] = (mode, data)
            continue
        if not any(marker_text(path, l) for l in text.split("\n")):
            snap[path] = (mode, data)  # no markers: present as-is from lesson 1
        elif out := render(path, text, n, known, exercise):
            snap[path] = (mode, out.encode())
    return snap


# -----------------------------------------------------------------------------
# The three commands


def commit(repo, snap, parent, message, n, env, blobs):
    """Write snapshot `snap` as a commit on `parent` through a private index."""
    # The index format git reads with --index-info: "<mode> <blob sha>\t<path>" per file.
    # A private GIT_INDEX_FILE holds it, so the user's staged changes are never touched.
    info = ""
    for path, (mode, data) in sorted(snap.items()):
        if data not in blobs:  # most files repeat across lessons: hash each text once
            blobs[data] = git(repo, "hash-object", "-w", "--stdin", data=data).decode().strip()
        info += f"{mode} {blobs[data]}\t{path}\n"
    git(repo, "read-tree", "--empty", env=env)
    git(repo, "update-index", "--add", "--index-info", data=info.encode(), env=env)
    tree = git(repo, "write-tree", env=env).decode().strip()
    stamp = f"{1767225600 + 60 * n} +0000"  # fixed author and date: a rebuild gives equal SHAs
    who = {f"GIT_{role}_{key}": value for role in ("AUTHOR", "COMMITTER")
           for key, value in (("NAME", "Intro2LLM"), ("EMAIL", "course@intro2llm"), ("DATE", stamp))}
    args = ["-p", parent] if parent else []
    return git(repo, "commit-tree", tree, *args, "-m", message, env={**env, **who}).decode().strip()


def build(repo):
    # Each lesson's commit has the previous lesson's as parent, so `git diff lesson06
    # lesson07` is lesson 7 and `git log lesson15` lists the syllabus; an exercise commit
    # is a sibling of its lesson (same parent), so its diff is the lesson with holes.
    files = read_tree(repo)
    known = lessons_of(files)
    parent, blobs = None, {}
    with tempfile.TemporaryDirectory() as tmp:
        env = {"GIT_INDEX_FILE": os.path.join(tmp, "index")}  # never the user's index
        for n, title in sorted(known.items()):
            snap = render_tree(files, n, known)
            sha = commit(repo, snap, parent, f"lesson {n:02d}: {title}", n, env, blobs)
            git(repo, "update-ref", f"refs/tags/lesson{n:02d}", sha)
            line = f"lesson{n:02d}  {sha[:10]}  {title}"
            exercise = render_tree(files, n, known, exercise=True)
            if exercise != snap:  # the -ex tag sits beside lessonNN, on lessonNN-1
                msg = f"lesson {n:02d} exercise: {title} (make its tests pass)"
                ex = commit(repo, exercise, parent, msg, n, env, blobs)
                git(repo, "update-ref", f"refs/tags/lesson{n:02d}-ex", ex)
                line += f"  (+ lesson{n:02d}-ex {ex[:10]})"
            print(line)
            parent = sha


def check(repo, worktree):
    files = read_tree(repo, worktree)
    known = lessons_of(files)
    problems = []
    for path, (_, data) in sorted(files.items()):
        try:
            text = data.decode()
            items = parse(path, text, known)
        except UnicodeDecodeError:
            continue
        except MarkerError as e:
            problems.append(str(e))
            continue
        # Marker density: a file wrapped whole in one block pays 2 lines it cannot avoid.
        marks, size = [i for i in items if i[0] != "line"], len(text.rstrip("\n").split("\n"))
        wrapped = len(marks) >= 2 and marks[0][2] == 1 and marks[-1][2] == size  # whole file
        share = (len(marks) - 2 * wrapped) / size
        if path.endswith(".py") and size >= 100 and share >= 0.05:  # small files: moot
            problems.append(f"{path}: marker lines are {share:.1%} of the file (limit 5%); "
                            "merge neighbouring blocks of the same lesson")
        stripped = [p for k, p, _ in items if k == "line"]
        if marks and render(path, text, max(known), known) != tidy(path, stripped):
            problems.append(f"{path}: the last lesson differs from main without markers; "
                            "a ranged block must end before the last lesson")
    if not problems:
        for n in sorted(known):
            for ex in (False, True):
                try:
                    snap = render_tree(files, n, known, ex)
                except MarkerError as e:
                    problems.append(str(e))
                    continue
                for path, (_, data) in snap.items():
                    if path.endswith(".py"):
                        try:
                            ast.parse(data, path)
                        except SyntaxError as e:
                            problems.append(f"lesson{n:02d}{'-ex' if ex else ''} {path}:{e.lineno}: "
                                            f"does not parse ({e.msg}); move the markers so each "
                                            "lesson keeps whole statements")
    for p in problems:
        print(p)
    print(f"lessons.py check: {len(known)} lessons, {len(files)} files, {len(problems)} problems")
    return not problems


def test(repo, numbers, worktree, exercise, slow):
    """Run each lesson's tests in a fresh render; an exercise render must fail its own."""
    files = read_tree(repo, worktree)
    known = lessons_of(files)
    if unknown := sorted(set(numbers) - set(known)):  # lesson 99 would quietly run the whole of main
        raise MarkerError(f"no lesson {', '.join(map(str, unknown))}: the lessons are "
                          f"{min(known)}-{max(known)} (the headings of lessons.md)")
    shared = os.environ.get("INTRO2LLM_SHARED", str(Path(repo).resolve().parent / "shared"))
    ok = True
    print(f"{'lesson':<12}{'result':<10}{'passed':>7}{'failed':>7}{'skipped':>8}{'seconds':>9}")
    passed_code = None  # the code (all but Markdown) of the last lesson that passed here
    for n in numbers or sorted(known):
        snap = render_tree(files, n, known, exercise)
        if exercise and snap == render_tree(files, n, known):
            print(f"lesson{n:02d}-ex  (this lesson has no exercise block)")
            continue
        code = {p: f for p, f in snap.items() if not p.endswith(".md")}
        if code == passed_code:  # only the course text changed: the same tests would run
            print(f"lesson{n:02d}{'-ex' if exercise else '':<6}{'ok':<10}(same code as the lesson before)")
            continue
        with tempfile.TemporaryDirectory(prefix=f"lesson{n:02d}-") as tmp:
            for path, (mode, data) in snap.items():
                f = Path(tmp, path)
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_bytes(data)
                f.chmod(0o755 if mode == "100755" else 0o644)
            t0 = time.time()
            # The builder's own tests run once, on main (they build toy repos, not lessons);
            # slow end-to-end tests only with --slow. junit.xml tells which test failed where.
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml",
                   "junit.xml", "--ignore=tests/test_lessons_builder.py", "tests"]
            res = subprocess.run(cmd + ([] if slow else ["-m", "not slow"]), cwd=tmp, text=True,
                                 capture_output=True, env={**os.environ, "INTRO2LLM_SHARED": shared})
            report = Path(tmp, "junit.xml")
            cases = list(ET.parse(report).iter("testcase")) if report.exists() else []
            failed = [c for c in cases if c.find("failure") is not None or c.find("error") is not None]
            skipped = [c for c in cases if c.find("skipped") is not None]
            own = [c for c in failed if f"test_l{n:02d}_" in c.get("classname", "")]
            if exercise:  # earlier lessons must still pass; this lesson's tests must notice
                good = res.returncode == 1 and len(own) == len(failed) > 0
            else:
                good = res.returncode in (0, 5)  # 5: no tests in this lesson yet
            print(f"lesson{n:02d}{'-ex' if exercise else '':<6}{'ok' if good else 'FAILED':<10}"
                  f"{len(cases) - len(failed) - len(skipped):>7}{len(failed):>7}{len(skipped):>8}"
                  f"{time.time() - t0:>9.1f}")
            passed_code = code if good else None
            if not good:
                ok = False
                print(res.stdout[-3000:] + res.stderr[-2000:])
    return ok


# -----------------------------------------------------------------------------
# The report: the course's chain, run on this checkout, and every number it prints

# (name, lesson, command, minutes on the report machine of lessons.md: the ETA's first guess,
# scaled by how this machine compares as stages finish; a CPU without native bf16 takes ~4x).
# Each stage runs its own command with its default config; only the folders move under the
# report's ({R}), so a report never overwrites the learner's out/. {S}{s}: the seed (--seeds).
STAGES = [
    ("pretrain", 8, "pretrain.py config/tiny.py --out_dir={R}/tiny", 4.7),
    ("eval", 9, "eval.py --ckpt {R}/tiny --task ppl mc story", 0.2),
    ("sft", 10, "sft.py config/sft.py --init={R}/tiny --out_dir={R}/sft{S} --seed={s}", 6.9),
    ("chat", 10, "chat.py {R}/sft", 0.1),
    ("dpo", 11, "align.py config/dpo.py --out_dir={R}/dpo --init={R}/sft", 3.2),
    ("reward", 12, "align.py config/reward.py --out_dir={R}/reward --init={R}/sft", 2.9),
    ("ppo", 12, "rl.py config/ppo.py --out_dir={R}/ppo{S} --init={R}/sft --seed={s}", 9.8),
    ("grpo", 13, "rl.py config/grpo.py --out_dir={R}/grpo{S} --init={R}/sft --seed={s}", 7.7),
    ("finetune", 14, "sft.py config/finetune.py --out_dir={R}/finetune --init={R}/sft", 3.2),
    ("lora", 14, "sft.py config/lora.py --out_dir={R}/lora --init={R}/sft", 3.7),
    ("qlora", 14, "sft.py config/qlora.py --out_dir={R}/qlora --init={R}/sft", 4.2),
    ("bench-train", 8, "bench.py train", 5),
    ("bench-attention", 15, "bench.py attention", 4.5),
]
SEEDS = [1337, 1, 2, 3, 4]  # --seeds N repeats the seed-sensitive stages (SFT, PPO, GRPO) with the first N
SMOKE = {  # --smoke: a few steps of each stage on a 300-story corpus and 24 chats a file (CI)
    "pretrain.py": "--max_iters=4 --eval_interval=2 --eval_iters=1 --log_interval=2 --batch_size=2 "
                   "--sample_tokens=8 --data_dir={R}/data",
    "eval.py": "--limit 4",
    "sft.py": "--max_iters=2 --eval_interval=2 --log_interval=1 --batch_size=2 --eval_n=4 --data={D}/sft/train.jsonl "
              "--val_data={D}/sft/val.jsonl --eval_story={D}/sft/eval_story.jsonl --eval_which={D}/sft/eval_which.jsonl",
    "align.py": "--max_iters=2 --eval_interval=2 --log_interval=1 --batch_size=2 --eval_pairs=4 --eval_examples=4 "
                "--data={D}/dpo/train.jsonl --val_data={D}/dpo/val.jsonl --eval_story={D}/sft/eval_story.jsonl",
    "rl.py": "--max_iters=2 --eval_interval=2 --log_interval=1 --eval_examples=4 --eval_k=2 --prompts_per_iter=2 "
             "--prompts={D}/sft/lost.jsonl --eval_story={D}/sft/eval_story.jsonl --eval_lost={D}/sft/eval_lost.jsonl",
}


def smoke_data(out):
    """The smoke run's data: a 300-story corpus for pretraining, and the first 24 lines of
    each built-in chat file (made, or remade when stale, by data/prepare.py as on first use)."""
    steps = [["data/prepare.py", "storyworld", "--stories", "300", "--out", str(out / "data/storyworld")]]
    steps += [["data/prepare.py", name, "--out", f"data/{name}", "--if_stale"] for name in ("sft", "dpo")]
    for argv in steps:
        if run_stage(argv, out / "prepare.log")[0]:
            raise SystemExit(f"lessons.py report: {' '.join(argv)} failed, see {out / 'prepare.log'}")
    for f in [*Path("data/sft").glob("*.jsonl"), *Path("data/dpo").glob("*.jsonl")]:
        (out / "smoke" / f.parent.name).mkdir(parents=True, exist_ok=True)
        with open(f) as src:
            (out / "smoke" / f.parent.name / f.name).write_text("".join(src.readlines()[:24]))


def run_stage(argv, log_path, stdin_text=None):
    """One stage as a child process, its output to log_path -> (return code, minutes, peak
    RSS in MiB). os.wait4 gives the child's own resource use, so the peak is that stage's."""
    t0 = time.time()
    with open(log_path, "w") as log:
        child = subprocess.Popen([sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.PIPE if stdin_text else subprocess.DEVNULL, text=True)
        if stdin_text:
            child.stdin.write(stdin_text)
            child.stdin.close()
        _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: Popen must not wait again
    peak = usage.ru_maxrss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10)  # bytes on macOS, KiB on Linux
    return child.returncode, (time.time() - t0) / 60, peak


def chat_script(repo):
    """chat.py's input for the transcript: greedy, answers of at most 24 tokens, two held-out
    story questions, a reset between them. A turn is one line, so the story's line break is typed as \\n."""
    rows = [json.loads(line) for line in open(Path(repo, "data/sft/eval_story.jsonl"))][:2]
    turns = [r["messages"][0]["content"].replace("\n", "\\n") for r in rows]
    return f"/temp 0\n/len 24\n{turns[0]}\n/reset\n{turns[1]}\n"


def measured(value):
    """An eval.json value as text: an exact match with its Wilson interval, a count per kind
    of question, a number; None for what is not a measurement."""
    if isinstance(value, dict) and "ci_low" in value:
        share = value.get("accuracy", value.get("exact_match"))
        return f"{share:.1%} ({value['ci_low']:.1%}–{value['ci_high']:.1%}, n = {value.get('n', value.get('items'))})"
    if isinstance(value, list) and len(value) == 2:
        return f"{value[0]}/{value[1]}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else None


def rows_of(d, prefix=""):
    """A nested eval.json -> {"story by_question Where did": "38/42", ...}: one row per measurement."""
    rows = {}
    for key, value in d.items():
        if (text := measured(value)) is not None:
            rows[prefix + key] = text
        if isinstance(value, dict):  # under a measurement, only its breakdowns (by_question)
            rows |= rows_of({k: v for k, v in value.items() if isinstance(v, dict)} if text else value, f"{prefix}{key} ")
    return rows


def stage_results(folder):
    """Markdown lines for what a stage's folder holds: its eval.json as before/after rows, the
    last row of its log (losses, KL), its plots."""
    lines = []
    if (f := folder / "eval.json").exists():
        ev = json.loads(f.read_text())
        before, after = rows_of(ev.get("before") or {}), rows_of(ev.get("after") or {})
        lines += ["| measured | before | after |", "| --- | --- | --- |"]
        lines += [f"| {k} | {before.get(k, '')} | {after.get(k, '')} |" for k in dict.fromkeys([*before, *after])]
    if (f := folder / "log.jsonl").exists() and (rows := f.read_text().split("\n")[-2:-1]):
        lines += ["", "last log row: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                   for k, v in json.loads(rows[0]).items())]
    lines += [f"![{f.name}]({f.parent.name}/{f.name})" for f in sorted(folder.glob("*.png"))]
    return lines


def cpu_name():
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform
        return platform.processor() or platform.machine()


def report(repo, out, chosen, seeds, smoke):
    """Run the chosen stages in order, then write out/report.md from every stage folder there
    (so a later --stages run updates its rows and keeps the rest). Returns True if all ran."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(repo)  # the stages' commands and configs are paths in the checkout
    known = [name for name, *_ in STAGES]
    if unknown := set(chosen) - set(known):
        raise SystemExit(f"lessons.py report: unknown stages {sorted(unknown)}; choose from {', '.join(known)}")
    if smoke:
        smoke_data(out)
    # One entry per run: a seed-sensitive stage once per seed, the rest once. Later stages
    # start from the first seed's SFT model, so --seeds measures spread without multiplying the chain.
    plan = [(name, lesson, cmd, minutes, seed) for name, lesson, cmd, minutes in STAGES if name in chosen
            for seed in (SEEDS[:seeds] if name in ("sft", "ppo", "grpo") else SEEDS[:1])]
    if smoke:
        plan = [p for p in plan if not p[0].startswith("bench")]  # timings: nothing to prove in a few steps
    # stages.json keeps every stage's command, minutes and peak across runs, so `--stages dpo`
    # reruns one stage and the report still shows the chain.
    done_path = out / "stages.json"
    done = json.loads(done_path.read_text()) if done_path.exists() else {}
    spent = guessed = 0.0
    # A report can span sessions (and OMP_NUM_THREADS settings): each stage keeps its own count.
    threads = os.environ.get("OMP_NUM_THREADS") or str(os.cpu_count())  # as set: it may be a list ("4,2")
    for i, (name, lesson, cmd, minutes, seed) in enumerate(plan):
        tag = name if seed == SEEDS[0] else f"{name}_s{seed}"
        argv = cmd.format(R=out, S="" if seed == SEEDS[0] else f"_s{seed}", s=seed).split()
        if smoke and argv[0] in SMOKE:
            argv += SMOKE[argv[0]].format(R=out, D=out / "smoke").split()
        left = sum(p[3] for p in plan[i:]) * (spent / guessed if guessed else 1)  # priors, scaled by this machine
        print(f"[{i + 1}/{len(plan)}] {tag}: python {' '.join(argv)}   (chain ETA {left:.0f} min)", flush=True)
        rc, took, peak = run_stage(argv, out / f"{tag}.log", chat_script(repo) if name == "chat" else None)
        done[tag] = {"lesson": lesson, "command": "python " + " ".join(argv), "minutes": round(took, 2),
                     "peak_mib": round(peak), "threads": threads, "ok": rc == 0}
        done_path.write_text(json.dumps(done, indent=2))
        spent, guessed = spent + took, guessed + minutes
        if rc:
            print(f"  failed (exit {rc}); the end of {out / f'{tag}.log'}:\n" + (out / f"{tag}.log").read_text()[-2000:])
            break
    write_report(repo, out, done)
    return all(v["ok"] for v in done.values())


def write_report(repo, out, done):
    commit = git(repo, "rev-parse", "--short", "HEAD").decode().strip()
    lines = [f"# Report: commit {commit}, {time.strftime('%Y-%m-%d')}", "",
             f"CPU: {cpu_name()}, {os.cpu_count()} cores. Every minute below is this machine's.", "",
             "| stage | lesson | minutes | threads | peak RSS (MiB) | command |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {t} | {v['lesson']:02d} | {v['minutes']:.1f} | {v.get('threads', '?')} | {v['peak_mib']:,} | "
              f"`{v['command']}`{'' if v['ok'] else ' (FAILED)'} |" for t, v in done.items()]
    for tag, v in sorted(done.items(), key=lambda kv: kv[1]["lesson"]):
        lines += ["", f"## Lesson {v['lesson']:02d}: {tag}", ""]
        if tag == "chat" or tag.startswith("bench"):  # their output is the result
            lines += ["```", (out / f"{tag}.log").read_text().strip(), "```"]
        elif tag == "eval":  # eval.py writes one file per task beside the checkpoint
            lines += [f"- {f.stem[5:]}: " + ", ".join(f"{k} {x}" for k, x in rows_of(json.loads(f.read_text())).items())
                      for f in sorted((out / "tiny").glob("eval_*.json"))]
        else:
            lines += stage_results(out / ("tiny" if tag == "pretrain" else tag))
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'report.md'}")


def main(argv):
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["build", "check", "test", "report"])
    ap.add_argument("lessons", nargs="*", type=int, help="test: which lessons (default all)")
    ap.add_argument("--worktree", action="store_true", help="read the work tree, not main")
    ap.add_argument("--exercise", action="store_true", help="test: the lessonNN-ex renders")
    ap.add_argument("--slow", action="store_true", help="test: include @pytest.mark.slow tests")
    ap.add_argument("--stages", default=",".join(name for name, *_ in STAGES), help="report: which, comma-separated")
    ap.add_argument("--seeds", type=int, default=1, help="report: runs of SFT, PPO and GRPO, one seed each")
    ap.add_argument("--smoke", action="store_true", help="report: a few steps of each stage (CI)")
    ap.add_argument("--out", default="report", help="report: the folder for its runs and report.md")
    if not argv:  # argparse would ask for "command, lessons", though only test takes lessons
        ap.print_help()
        return 2
    args = ap.parse_args(argv)
    repo = git(".", "rev-parse", "--show-toplevel").decode().strip()
    try:
        if args.command == "build":
            build(repo)
            return 0
        if args.command == "report":
            return 0 if report(repo, args.out, args.stages.split(","), args.seeds, args.smoke) else 1
        if args.command == "check":
            return 0 if check(repo, args.worktree) else 1
        return 0 if test(repo, args.lessons, args.worktree, args.exercise, args.slow) else 1
    except MarkerError as e:
        print(f"lessons.py: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
