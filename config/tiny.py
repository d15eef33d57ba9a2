#> L08 config
# The main job: a ~1M-parameter model on the built-in story world, ~5 minutes on a 2-core CPU.
# python pretrain.py config/tiny.py
dataset = "storyworld"
out_dir = "out/tiny"
model = "tiny"
block_size = 128
batch_size = 16
max_iters = 1500
lr = 2e-3
min_lr = 2e-4
warmup_iters = 100
eval_interval = 250
log_interval = 50
#< L08
