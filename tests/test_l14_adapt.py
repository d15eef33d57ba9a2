#> L14 adapt-tests
"""Lesson 14's adaptation task: its data against the story text, its split, and the
trainable parameters of config/finetune.py, config/lora.py and config/qlora.py."""

import json
import re

import pytest
import torch.nn as nn

import eval as E
import sft
import storyworld as W
from model import CausalLM, ModelConfig, preset
from run import apply_adapter, load_config
from tokenizer import CHAT_TOKENS

from conftest import ROOT, run_doctests
from test_l10_sft import base, sft_config, tuned  # noqa: F401 (fixtures: a tiny base, and it tuned)


def facts_from_text(story, question):
    """The answer to a Which-question, read off the story's text with regexes (not from
    story.facts) and written as lesson 10 writes it: an oracle independent of the generator."""
    text = story.text
    if m := re.fullmatch(r"Which place did (\w+) find the (\w+) at\?", question):
        return "At " + re.search(r"(?:went to|walked to|visit) (the \w+)", text).group(1) + "."
    if m := re.fullmatch(r"Which colour did the (\w+) have\?", question):
        return re.search(rf"(\w+) {m[1]}\b", text).group(1)  # "a big red kite": the word before
    if m := re.fullmatch(r"Which of the two had the (\w+) at the end\?", question):
        owner = re.search(rf"(?:In the end, (\w+) had the \w+ {m[1]}|the \w+ {m[1]} was with (\w+)\.)", text)
        return f"At the end, it was with {owner[1] or owner[2]}."
    if m := re.fullmatch(r"Which thing did (\w+) lose\?", question):
        said = re.search(rf"{m[1]} the \w+ (?:was \w+ because|looked \w+:) \w+ had lost (\w+) (\w+)\.", text)
        return f"{m[1]} lost {said[1]} {said[2]}."
    if m := re.fullmatch(r"Which kind of animal or person was (\w+)\?", question):
        return "a " + re.search(rf"a (\w+) (?:named|called) {m[1]}\b", text).group(1)
    if m := re.fullmatch(r"Which feeling did (\w+) have after finding the (\w+)\?", question):
        return re.search(rf"{m[1]} felt (\w+)\.", text).group(1)  # the first feeling: after the find
    raise AssertionError(f"unexpected question {question!r}")


@pytest.mark.parametrize("seed", [1, 42, 1337])
def test_which_answers_are_the_storys_facts(seed):
    for story in W.stories(seed, 0, 40):
        pairs = W.which_questions(story)
        assert len(pairs) == len(W.QUESTIONS) and all(q.startswith("Which ") for q, _ in pairs)
        for question, answer in pairs:
            assert answer == facts_from_text(story, question), story.text


def test_adapt_set_is_split_by_story_and_mixes_old_chats():
    sets = W.adapt_sets(7, train_stories=300, val_stories=40, new=90, old=60)
    train, held_out = sets["adapt"], sets["eval_which"]
    assert len(train) == 150 and len(held_out) == 40
    first = lambda c: next(m for m in c if m["role"] == "user")["content"]
    new = [c for c in train if first(c).startswith("Question: Which ")]
    assert len(new) == 90  # the rest are lesson 10's questions, rehearsed
    assert all(len(c) in (2, 12) for c in new)  # one question or all six
    seen = {m["content"].split("\n", 1)[1] for c in train for m in c  # the story under a first question
            if m["role"] == "user" and "\n" in m["content"]}
    held_texts = [s.text for s in W.stories(7, 300, 40)]
    assert [c[0]["content"].split("\n", 1)[1] for c in held_out] == held_texts  # one question each
    assert not seen & set(held_texts)  # no held-out story is trained on
    for chat, story in zip(held_out, W.stories(7, 300, 40)):
        question = chat[0]["content"].split("\n", 1)[0].removeprefix("Question: ")
        assert chat[1]["content"] == facts_from_text(story, question)


def lora_count(model, r):
    """LoRA's parameters by the formula: r (d_in + d_out) for each Linear of the blocks
    (PEFT's all-linear leaves the output head alone)."""
    return sum(r * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name != "lm_head")


@pytest.mark.parametrize("name", ["finetune", "lora", "qlora"])
def test_adaptation_configs_train_what_they_say(name):
    cfg = load_config(ROOT / "config" / f"{name}.py", sft.DEFAULTS)
    assert cfg["task"] == "which" and cfg["init"] == "out/sft" and cfg["data"].endswith("adapt.jsonl")
    model = CausalLM(ModelConfig(**{**preset("tiny").__dict__, "vocab_size": 796, "block_size": 256}))
    total = model.num_params()
    if name == "finetune":
        assert cfg["lora_rank"] == 0
        return
    assert 0 < cfg["lora_rank"] <= 8 and cfg["qlora"] == (name == "qlora")
    expected = lora_count(model, cfg["lora_rank"])
    apply_adapter(model, dict(r=cfg["lora_rank"], alpha=cfg["lora_alpha"], targets=cfg["lora_targets"],
                              qlora=cfg["qlora"], tokens=[]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == expected and expected / total <= 0.10


def test_sft_measures_its_task_first_and_skips_an_empty_path(tuned, base):
    """sft.py's before/after evaluation: the config's task first, then lesson 10's story
    questions (what an adaptation must keep); a task whose file is "" is not run."""
    out, _ = tuned
    model, tok, _ = sft.load_run(out)
    facts = str(base[0] / "facts.jsonl")
    cfg = {**sft.DEFAULTS, "task": "which", "eval_which": facts, "eval_story": facts,
           "eval_n": 4}
    results = sft.evaluate(model, tok, cfg, log=lambda *a: None)
    assert list(results) == ["which", "story"]
    assert results["which"]["accuracy"] == 1.0 and results["which"]["n"] == 4
    assert list(sft.evaluate(model, tok, {**cfg, "eval_story": ""}, log=lambda *a: None)) == ["which"]


def test_eval_py_which_task_needs_a_chat_model(base, tuned):
    """eval.py --task which writes eval_which.json for a chat model and refuses, in
    one line, a base model that only completes text."""
    root, _ = base
    with pytest.raises(SystemExit, match="asks a chat model"):
        E.main(["--ckpt", str(root / "base"), "--task", "which"])
    out, _ = tuned
    E.main(["--ckpt", str(out), "--task", "which", "--file", str(root / "facts.jsonl")])
    result = json.loads((out / "eval_which.json").read_text())
    assert result["exact_match"] == 1.0 and result["items"] == 4


def test_sft_prints_every_trainable_parameter(base, tmp_path, capsys):
    """Full fine-tuning counts every weight; a LoRA run its A, B pairs plus the chat-token
    rows it trains (one delta per row, shared by the tied embedding and head)."""
    root, tok = base
    for rank in (0, 4):
        sft.train(sft_config(root, tmp_path / f"r{rank}", max_iters=2, eval_n=0, lora_rank=rank))
    out = capsys.readouterr().out
    model = CausalLM(ModelConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=2, n_head=2, n_embd=32))
    n = model.num_params()
    assert f"every weight: {n:,} trainable parameters, 100.00% of the base's {n:,}" in out
    lora = lora_count(model, 4) + len(CHAT_TOKENS) * 32
    layers = sum(isinstance(m, nn.Linear) for name, m in model.named_modules() if name != "lm_head")
    assert f"LoRA r=4 on {layers} layers: {lora:,} trainable parameters, {lora / n:.2%} of the base's {n:,}" in out


def test_docstring_examples():
    """The >>> examples lesson 14 wrote run as printed."""
    run_doctests(W.which_questions)
#< L14
