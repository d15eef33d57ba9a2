#> L14 tests
"""Issue 17, lesson 14's part: LoRA SFT from a Hugging Face folder (a tiny Qwen3 built
with transformers) through sft.py; the run names its base folder and hash, reloads, keeps
the model's chat template, and its adapter loads in the `peft` library with equal logits."""

import json
import subprocess
import sys

import pytest
import torch

import bench
import peft as P
import sft
from hf import file_sha256
from run import load_checkpoint, load_run
from test_l10_real_chat import ROOT, make_hf_folder
from test_l10_sft import sft_config
from test_l14_peft import needs_peft

CHATS = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
         for q, a in [("hello", "I am fine."), ("the quick brown fox", "jumps over the lazy dog"),
                      ("2 + 2 =", "4"), ("naïve café?", "Straße, 12,345 km")]]

PEFT_ORACLE = """
import torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("qwen3"), "adapter").eval()
with torch.no_grad():
    torch.save(model(torch.load("idx.pt", weights_only=True)).logits, "out.pt")
"""


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A tiny Qwen3 folder, a chat JSONL of our own, and 4 LoRA steps of sft.py on them."""
    root = tmp_path_factory.mktemp("hf_lora")
    folder = make_hf_folder(root, "qwen3")
    (root / "facts.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
    cfg = sft_config(root, root / "out", init=str(folder), eval_n=0, lora_rank=4, lora_tokens="none",
                     max_iters=4, batch_size=2, eval_interval=4, log_interval=4, lr=3e-2, warmup_iters=0)
    sft.train(cfg)
    return root, folder


def test_lora_sft_from_a_folder_names_its_base_and_reloads(lora_run):
    """Guards a LoRA run over a downloaded model: the checkpoint holds the adapter alone
    and names the folder with its hash (a changed base is refused), load_run rebuilds
    base + adapter, and the tokenizer keeps Qwen3's template (the tuned model chats in it)."""
    root, folder = lora_run
    ckpt = load_checkpoint(root / "out" / "ckpt.pt")
    assert ckpt["lora"]["base"] == str(folder.resolve())
    assert ckpt["lora"]["base_sha256"] == file_sha256(folder) and ckpt["chat"]
    assert all(".lora_" in k for k in ckpt["model"])
    model, tok, _ = load_run(root / "out")
    base, _, _ = load_run(folder)
    assert tok.chat_format["name"] == "qwen3" and len(P.lora_modules(model)) == 14
    idx = torch.tensor([tok.render_conversation(CHATS[0])[0]])
    with torch.no_grad():
        assert (model(idx)[0] - base(idx)[0]).abs().max() > 1e-3  # the adapter learned something
    (folder / "config.json").write_text((folder / "config.json").read_text() + " ")  # one byte more
    try:
        with pytest.raises(ValueError, match="changed since"):
            load_run(root / "out")
    finally:
        (folder / "config.json").write_text((folder / "config.json").read_text()[:-1])


@needs_peft
def test_peft_library_loads_the_adapter_of_a_folder_run(lora_run):
    """The adapter trained on a Hugging Face folder, exported with save_adapter, must give
    our logits in `peft` over transformers' model of that same folder: guards module names,
    scaling and the base weights meeting in the real libraries."""
    root, folder = lora_run
    model, tok, _ = load_run(root / "out")
    P.save_adapter(model, root / "adapter", base_model=folder)
    idx = torch.tensor([tok.render_conversation(CHATS[1])[0]])
    torch.save(idx, root / "idx.pt")
    bench.run_outside_repo(PEFT_ORACLE, root)
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], torch.load(root / "out.pt", weights_only=True),
                                   rtol=0, atol=2e-5)


@pytest.mark.slow
def test_the_readme_commands_on_a_folder(lora_run, tmp_path):
    """The commands a learner types, as subprocesses from the repository: LoRA SFT of a
    model folder on their own JSONL with config/sft.py, then chat.py on the result."""
    root, folder = lora_run
    data, out = root / "facts.jsonl", tmp_path / "my_lora"
    run = lambda *cmd, stdin="": subprocess.run([sys.executable, *map(str, cmd)], input=stdin, cwd=ROOT,
                                                capture_output=True, text=True, timeout=300)
    r = run("sft.py", "config/sft.py", f"--init={folder}", "--lora_rank=16", f"--data={data}",
            f"--val_data={data}", "--eval_n=0", "--max_iters=2", "--eval_iters=1", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "LoRA r=16 on 14 layers" in r.stdout and load_checkpoint(out / "ckpt.pt")["step"] == 2
    r = run("chat.py", out, stdin="/len 3\nhello\n")
    assert r.returncode == 0 and "chat model" in r.stdout.splitlines()[0], r.stderr[-2000:]
#< L14
