#> L08 config
# GPT-2 small (124M parameters) on GPUs, launched with torchrun:
#   torchrun --standalone --nproc_per_node=8 pretrain.py config/gpt2.py
# Token budget: Chinchilla (Hoffmann et al. 2022) suggests ~20 tokens per parameter,
# 124M x 20 = 2.5B tokens. One step here is batch_size 16 x block_size 1024 x grad_accum 4
# x 8 GPUs = 524,288 tokens (~0.5M, GPT-3's batch for this size), so 2.5B tokens take
# ~4,800 steps. At 6N + 12LHQT = ~0.87 GFLOP per token that is ~2.2e18 FLOPs: on 8 A100s
# at 40% MFU (8 x 312e12 x 0.4 = 1e15 FLOP/s) about 40 minutes.
# The dataset needs a GPT-2-sized corpus (TinyStories at least): python data/prepare.py tinystories
dataset = "tinystories"
out_dir = "out/gpt2"
model = "gpt2"
block_size = 1024
batch_size = 16
grad_accum = 4
max_iters = 4800
lr = 6e-4
min_lr = 6e-5
warmup_iters = 200
weight_decay = 0.1
dropout = 0.0
compile = True
eval_interval = 250
eval_iters = 50
log_interval = 10
peak_flops = 312e12
#< L08
