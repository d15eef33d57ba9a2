#> L08 config
# nanoGPT's CPU recipe on Tiny Shakespeare, character level, for a side-by-side comparison:
# 4 layers, 4 heads, 128 wide, context 64, batch 12, 2000 iterations, lr 1e-3, no dropout.
# Our block (RoPE, RMSNorm, SwiGLU) replaces GPT-2's; everything else follows the recipe.
# python data/prepare.py shakespeare_char --source ../shared/data/tinyshakespeare.txt  (offline)
# python pretrain.py config/shakespeare_char.py
# Speed beside nanoGPT: python bench.py train --vs-nanogpt ../nanoGPT (one thread each). Here
# dtype auto is bf16 autocast, ~1.8x its tokens/s. --compile=auto is ~10% faster per step, but
# its compile time (~15 s on one core) costs more than that over 2000 steps, so it stays off.
dataset = "shakespeare_char"
out_dir = "out/shakespeare_char"
model = "tiny"
n_layer = 4
n_head = 4
n_embd = 128
block_size = 64
batch_size = 12
max_iters = 2000
lr = 1e-3
min_lr = 1e-4
warmup_iters = 100
dropout = 0.0
eval_interval = 250
eval_iters = 200
log_interval = 100
#< L08
