"""Shared test plumbing: import the stage files from the repo root, find ../shared."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `import tokenizer` etc. from any working directory
sys.path.insert(0, str(ROOT / "data"))  # `import storyworld, prepare`

# lessons.py renders each lesson into a temporary folder and points here with the env var.
SHARED = Path(os.environ.get("INTRO2LLM_SHARED", ROOT.parent / "shared"))


def run_doctests(*objects):
    """Run the >>> examples in the docstrings of these functions and classes (not their
    methods) in their module's namespace; fail with doctest's report. Each lesson's tests
    call it for the examples its lesson wrote, so a wrong example fails that lesson."""
    import doctest
    finder, runner = doctest.DocTestFinder(recurse=False), doctest.DocTestRunner()
    report = []
    for obj in objects:
        tests = finder.find(obj, globs=dict(vars(sys.modules[obj.__module__])))
        assert any(t.examples for t in tests), f"{obj.__qualname__} has no >>> examples"
        for test in tests:
            runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end checks (.ci/run still runs them)")


@pytest.fixture
def shared():
    """The ../shared folder (real corpora, tiktoken's cache); skip when a clone lacks it."""
    if not (SHARED / "data").is_dir():
        pytest.skip(f"needs the course's shared data folder at {SHARED} (set INTRO2LLM_SHARED)")
    return SHARED
#> L08 ctrl-c


@pytest.fixture
def ctrl_c_at(monkeypatch):
    """ctrl_c_at(module, step): the module's training loop gets a Ctrl-C (KeyboardInterrupt)
    when it asks get_lr for `step` -- a run stopped mid-way, for resume tests.
    monkeypatch.undo() lets the next run go on."""

    def arm(module, step):
        real = module.get_lr

        def get_lr(it, cfg):
            if it == step:
                raise KeyboardInterrupt
            return real(it, cfg)

        monkeypatch.setattr(module, "get_lr", get_lr)

    return arm
#< L08
