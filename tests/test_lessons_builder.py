"""Tests of lessons.py on a toy course made in tmp_path with `git init`.

The toy files are written as lists of lines so that this file's own lines never
start with a marker (lessons.py reads every file of the real repo too).
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

LESSONS = Path(__file__).resolve().parents[1] / "lessons.py"

TOY = {
    "lessons.md": [
        "# Toy course",
        "<!-- #> L01 one -->",
        "## Lesson 01 — Basics",
        "Start here.",
        "<!-- #< L01 -->",
        "<!-- #> L02 two -->",
        "## Lesson 02 — Greeting",
        "<!-- #< L02 -->",
        "<!-- #> L03 three -->",
        "## Lesson 03 — Shouting",
        "<!-- #< L03 -->",
    ],
    "a.py": [
        "import os",
        "",
        "",
        "#> L02 greet",
        "def greet(name):",
        '    """Say hello."""',
        "    #> L03 shout exercise",
        "    name = name.upper()",
        "    #< L03",
        '    return "hi " + name',
        "#< L02",
        "",
        "",
        "#> L01-L02 old-value",
        "#| VALUE = 1",
        "#< L01-L02",
        "#> L03 new-value",
        "VALUE = 2",
        "#< L03",
    ],
    "b.py": [  # a file that first appears in lesson 2, with an exercise method in a class
        "#> L02 counter",
        "class Counter:",
        "    #> L02 add exercise",
        "    @staticmethod",
        "    def add(x,",
        "            y):",
        '        """Add two numbers."""',
        "        # the sum",
        "        return x + y",
        "    #< L02",
        "#< L02",
    ],
    "tests/conftest.py": ["import sys, pathlib", "sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))"],
    "tests/test_l02_greet.py": [
        "#> L02 tests",
        "import a, b",
        "def test_value():",
        "    assert a.VALUE in (1, 2)",
        "def test_add():",
        "    assert b.Counter.add(2, 3) == 5",
        "#< L02",
    ],
    "tests/test_l03_shout.py": [
        "#> L03 tests",
        "import a",
        "def test_shout():",
        "    assert a.greet('x') == 'hi X'",
        "#< L03",
    ],
}

# What each lesson must render, file by file (None: the file does not exist yet).
EXPECTED = {
    1: {"a.py": "import os\n\n\nVALUE = 1\n", "b.py": None,
        "lessons.md": "# Toy course\n## Lesson 01 — Basics\nStart here.\n"},
    2: {"a.py": 'import os\n\n\ndef greet(name):\n    """Say hello."""\n    return "hi " + name\n\n\nVALUE = 1\n',
        "b.py": 'class Counter:\n    @staticmethod\n    def add(x,\n            y):\n        """Add two numbers."""\n'
                "        # the sum\n        return x + y\n"},
    3: {"a.py": 'import os\n\n\ndef greet(name):\n    """Say hello."""\n    name = name.upper()\n'
                '    return "hi " + name\n\n\nVALUE = 2\n'},
}


def git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                          check=True).stdout.strip()


def lessons(repo, *args):
    return subprocess.run([sys.executable, str(LESSONS), *args], cwd=repo, capture_output=True,
                          text=True)


def make_repo(root, files):
    root.mkdir(exist_ok=True)
    git(root, "init", "-q", "-b", "main")
    for path, lines in files.items():
        Path(root, path).parent.mkdir(parents=True, exist_ok=True)
        Path(root, path).write_text("\n".join(lines) + "\n")
    git(root, "add", "-A")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "toy")
    return root


@pytest.fixture
def toy(tmp_path):
    return make_repo(tmp_path / "toy", TOY)


def show(repo, rev, path):
    res = subprocess.run(["git", "-C", str(repo), "show", f"{rev}:{path}"], capture_output=True,
                         text=True)
    return res.stdout if res.returncode == 0 else None


def test_build_renders_each_lesson_exactly(toy):
    """Guards the core rendering: added, nested and ranged blocks, Markdown, late files."""
    res = lessons(toy, "build")
    assert res.returncode == 0, res.stderr
    assert [line.split()[0] for line in res.stdout.splitlines()] == ["lesson01", "lesson02", "lesson03"]
    for n, files in EXPECTED.items():
        for path, text in files.items():
            assert show(toy, f"lesson{n:02d}", path) == text, (n, path)
    assert show(toy, "lesson01", "tests/test_l02_greet.py") is None
    assert show(toy, "lesson03", "lessons.md").count("## Lesson") == 3


def test_tags_chain_and_diffs_show_one_lesson(toy):
    """lessonN's parent is lessonN-1, so `git diff lesson02 lesson03` is exactly lesson 3."""
    lessons(toy, "build")
    assert git(toy, "rev-list", "--parents", "-n1", "lesson01").split()[1:] == []
    assert git(toy, "rev-parse", "lesson02^") == git(toy, "rev-parse", "lesson01")
    assert git(toy, "rev-parse", "lesson03^") == git(toy, "rev-parse", "lesson02")
    assert git(toy, "rev-parse", "lesson03-ex^") == git(toy, "rev-parse", "lesson02")
    changed = git(toy, "diff", "--name-only", "lesson02", "lesson03").split()
    assert changed == ["a.py", "lessons.md", "tests/test_l03_shout.py"]
    diff = git(toy, "diff", "lesson02", "lesson03", "--", "a.py")
    assert "+    name = name.upper()" in diff and "-VALUE = 1" in diff and "+VALUE = 2" in diff
    assert git(toy, "log", "--format=%s", "lesson03").splitlines() == [
        "lesson 03: Shouting", "lesson 02: Greeting", "lesson 01: Basics"]


def test_exercise_tags_blank_functions_and_blocks(toy):
    """In lessonNN-ex a function keeps decorators, signature and docstring; a block inside an
    older function becomes one raise; other lessons' code is untouched."""
    lessons(toy, "build")
    b = show(toy, "lesson02-ex", "b.py")
    assert b == ('class Counter:\n    @staticmethod\n    def add(x,\n            y):\n'
                 '        """Add two numbers."""\n'
                 '        raise NotImplementedError("lesson 02: implement Counter.add")\n')
    a = show(toy, "lesson03-ex", "a.py")
    assert a == ('import os\n\n\ndef greet(name):\n    """Say hello."""\n'
                 '    raise NotImplementedError("lesson 03: implement this part of greet")\n'
                 '    return "hi " + name\n\n\nVALUE = 2\n')
    assert show(toy, "lesson02-ex", "a.py") == EXPECTED[2]["a.py"]
    assert show(toy, "lesson01-ex", "a.py") is None  # lesson 1 has no exercise: no tag
    ast.parse(a), ast.parse(b)


def test_rebuild_is_identical_and_touches_nothing(toy):
    """Fixed author/dates give the same SHAs; the work tree, index, HEAD and branches stay."""
    Path(toy, "a.py").write_text("dirty work in progress\n")  # uncommitted: must be ignored
    Path(toy, "new.txt").write_text("untracked\n")
    git(toy, "add", "new.txt")
    before = (git(toy, "status", "--porcelain"), git(toy, "rev-parse", "HEAD"),
              git(toy, "symbolic-ref", "HEAD"), Path(toy, ".git/index").read_bytes(),
              git(toy, "branch", "--list"))
    lessons(toy, "build")
    first = git(toy, "show-ref", "--tags")
    lessons(toy, "build")
    assert git(toy, "show-ref", "--tags") == first
    assert len(first.splitlines()) == 5  # 3 lessons + 2 exercise tags
    after = (git(toy, "status", "--porcelain"), git(toy, "rev-parse", "HEAD"),
             git(toy, "symbolic-ref", "HEAD"), Path(toy, ".git/index").read_bytes(),
             git(toy, "branch", "--list"))
    assert after == before
    assert show(toy, "lesson03", "a.py") == EXPECTED[3]["a.py"]  # from main, not the work tree


def test_check_passes_on_a_good_course(toy):
    res = lessons(toy, "check")
    assert res.returncode == 0, res.stdout
    assert "3 lessons" in res.stdout and "0 problems" in res.stdout


@pytest.mark.parametrize("lines, message", [
    (["#> L02 x", "y = 1"], "a.py: block `#> L02 x` is never closed; add `#< L02`"),
    (["#> L02 x", "y = 1", "#< L03"], "a.py:3: `#< L03` does not match; expected `#< L02`"),
    (["#> L03 x", "#> L02 y", "#< L02", "#< L03"], "a.py:2: L02 nested inside L03"),
    (["#> L01-L02 x", "y = 1", "#< L01-L02"], "a.py:2: a ranged block holds only `#| code` lines"),
    (["#> L01-L03 x", "#| y = 1", "#< L01-L03"], "must end before the last lesson"),
    (["#> L09 x", "#< L09"], "a.py:1: lesson 09 is not in lessons.md"),
    (["#| y = 1"], "a.py:1: `#|` line outside a ranged block"),
    (["#> L02"], "a.py:1: malformed marker `#> L02`"),
    (["if True:", "#> L02 x", "    y = 1", "#< L02"], "lesson01 a.py:1: does not parse (expected an indented block"),
    (["#> L02 x", "#< L02"] * 3 + ["y = 1"] * 94, "a.py: marker lines are 6.0% of the file"),
])
def test_check_names_file_line_and_fix(tmp_path, lines, message):
    """Each malformed course is rejected with the file, the line and what to do."""
    repo = make_repo(tmp_path / "bad", {"lessons.md": TOY["lessons.md"], "a.py": lines})
    res = lessons(repo, "check")
    assert res.returncode == 1
    assert message in res.stdout, res.stdout


def test_check_worktree_reads_uncommitted_files(toy):
    Path(toy, "c.py").write_text("#> L02 x\ny = 1\n")
    assert lessons(toy, "check").returncode == 0  # main is still fine
    res = lessons(toy, "check", "--worktree")
    assert res.returncode == 1 and "c.py: block `#> L02 x` is never closed" in res.stdout


def test_builder_runs_each_lessons_tests_and_exercises_fail_their_own(toy):
    """`test` runs lessons 1..3 in fresh renders; `--exercise` demands that lesson N's tests
    fail on the blanked code while every earlier lesson's still pass."""
    res = lessons(toy, "test")
    assert res.returncode == 0, res.stdout
    rows = {line.split()[0]: line.split()[1:4] for line in res.stdout.splitlines()[1:]}
    assert rows == {"lesson01": ["ok", "0", "0"], "lesson02": ["ok", "2", "0"],
                    "lesson03": ["ok", "3", "0"]}
    res = lessons(toy, "test", "2", "3", "--exercise")
    assert res.returncode == 0, res.stdout
    rows = {line.split()[0]: line.split()[1:4] for line in res.stdout.splitlines()[1:]}
    assert rows == {"lesson02-ex": ["ok", "1", "1"], "lesson03-ex": ["ok", "2", "1"]}
    assert "test_l02" not in res.stdout  # a broken earlier lesson would be listed
    Path(toy, "tests/test_l03_shout.py").write_text("import a\ndef test_shout():\n    assert 0\n")
    res = lessons(toy, "test", "3", "--worktree")
    assert res.returncode == 1 and "lesson03" in res.stdout and "FAILED" in res.stdout
    res = lessons(toy, "test", "2", "9")  # no lesson 9: an error, not a run of all of main
    assert res.returncode == 1 and "no lesson 9: the lessons are 1-3" in res.stderr, res.stderr
    assert "lesson02" not in res.stdout


def test_lessons_whose_code_did_not_change_are_not_rerun(tmp_path):
    """Lessons 2 and 3 only add course text: their tests would be lesson 1's again."""
    repo = make_repo(tmp_path / "same", {"lessons.md": TOY["lessons.md"], "a.py": ["X = 1"],
                                         "tests/test_l01_a.py": ["def test_a():", "    assert True"]})
    res = lessons(repo, "test")
    assert res.returncode == 0, res.stdout
    lines = res.stdout.splitlines()[1:]
    assert lines[0].split()[:3] == ["lesson01", "ok", "1"]
    assert all("(same code as the lesson before)" in line for line in lines[1:]) and len(lines) == 3


def test_report_turns_a_stage_folder_into_rows(tmp_path):
    """report.md's rows from a stage's files: an exact match with its Wilson interval and its
    counts per kind of question, before beside after; the last log row; the plots."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lessons", LESSONS)
    lessons = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lessons)
    story = {"accuracy": 0.88, "ci_low": 0.8277, "ci_high": 0.9180, "n": 200, "by_question": {"Where did": [38, 42]}}
    (tmp_path / "eval.json").write_text(json.dumps({"before": {"story": {**story, "accuracy": 0.0}},
                                                    "after": {"story": story, "chat": True, "kl": 0.01234}}))
    (tmp_path / "log.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    (tmp_path / "loss.png").write_bytes(b"")
    lines = lessons.stage_results(tmp_path)
    assert "| story | 0.0% (82.8%–91.8%, n = 200) | 88.0% (82.8%–91.8%, n = 200) |" in lines
    assert "| story by_question Where did | 38/42 | 38/42 |" in lines
    assert "| kl |  | 0.01234 |" in lines and not any("chat" in line for line in lines)
    assert "last log row: step 2, loss 1.5" in lines and f"![loss.png]({tmp_path.name}/loss.png)" in lines
