#> L08 config
# The main job: a ~1M-parameter model on the built-in story world, ~5 minutes on a 2-core CPU.
# python pretrain.py config/tiny.py
dataset = "storyworld"
out_dir = "out/tiny"
model = "tiny"
# 256, not 128: lesson 10 fine-tunes this model on a whole story (up to 126 tokens) with its
# questions and answers in the chat template, which must fit one context (sft.py drops, and
# counts, the 12% of conversations longer than that: six questions about the longest stories).
block_size = 256
# Many small steps rather than few big ones on a fixed 5-minute budget: by step ~1,500 the model
# learns to copy a character's name from earlier in the story (val loss 0.77 there, 0.580 at
# the end; lesson 08's Try compares batch shapes).
batch_size = 8
max_iters = 3000
lr = 2e-3
min_lr = 2e-4
warmup_iters = 100
eval_interval = 500
log_interval = 100
#< L08
