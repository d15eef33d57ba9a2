#> L08 config
# A ~12M-parameter model on the story world: better samples, ~1 hour on a 2-core CPU,
# minutes on a GPU.
dataset = "storyworld"
out_dir = "out/small"
model = "small"
block_size = 256
batch_size = 16
max_iters = 5000
lr = 1e-3
min_lr = 1e-4
warmup_iters = 200
dropout = 0.1
eval_interval = 500
log_interval = 50
#< L08
