#> L10 config
# Lesson 10: fine-tune the base model of config/tiny.py on the story world's chats.
# python sft.py config/sft.py   (after python pretrain.py config/tiny.py)
init = "out/tiny"
out_dir = "out/sft"
batch_size = 16
pack = True  # same loss as padding (tests/test_l10_sft.py), fewer wasted positions
max_iters = 1000
lr = 1e-3
min_lr = 1e-4
warmup_iters = 50
eval_interval = 250
log_interval = 50
eval_n = 200
#< L10
