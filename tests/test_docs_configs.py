"""The course text quotes config values: each must be what the config file says.

The convention it checks: a paragraph of lessons.md or README.md that names one config file
(`config/grpo.py`) and quotes a setting as code (`lr = 1e-4`) states that file's value. A
config changed without its text fails here, before a learner reads the old number.
"""

import ast
import re

import pytest

from conftest import ROOT


def config_values(path):
    """{name: value} of a config file's plain `name = value` lines."""
    return {target.id: ast.literal_eval(node.value) for node in ast.parse(path.read_text()).body
            if isinstance(node, ast.Assign) for target in node.targets if isinstance(target, ast.Name)}


def quoted_settings(text):
    """(config name, key, quoted value) for each `key = value` code span in a paragraph that
    names exactly one config file (a paragraph comparing two cannot say whose value it is)."""
    for paragraph in re.split(r"\n\s*\n", text):
        names = set(re.findall(r"config/(\w+)\.py", paragraph))
        if len(names) == 1:
            name = names.pop()
            for key, value in re.findall(r"`(\w+) = ([^`]+)`", paragraph):
                yield name, key, value


def test_the_convention_reads_one_config_per_paragraph():
    text = ("`config/sft.py` trains at `lr = 3e-3`; see `batch_size = 16`.\n\n"
            "`config/a.py` and `config/b.py` differ: `lr = 1`.\n\nNo config here: `lr = 2`.")
    assert list(quoted_settings(text)) == [("sft", "lr", "3e-3"), ("sft", "batch_size", "16")]


@pytest.mark.parametrize("doc", ["lessons.md", "README.md"])
def test_quoted_config_values_agree_with_the_files(doc):
    if not (ROOT / doc).exists():
        pytest.skip(f"{doc} is not in this lesson's snapshot")
    wrong = []
    for name, key, value in quoted_settings((ROOT / doc).read_text(encoding="utf-8")):
        path = ROOT / "config" / f"{name}.py"
        if not path.exists():
            wrong.append(f"config/{name}.py does not exist (quoted with `{key} = {value}`)")
            continue
        values = config_values(path)
        if key in values and values[key] != ast.literal_eval(value):
            wrong.append(f"config/{name}.py has {key} = {values[key]!r}, {doc} says {value}")
    assert not wrong, "\n".join(wrong)
