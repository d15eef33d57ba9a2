#> L11 config
# DPO from the SFT model of lesson 10 on story-question pairs (right vs wrong answer).
# python data/prepare.py dpo && python align.py config/dpo.py
method = "dpo"
init = "out/sft"
out_dir = "out/dpo"
beta = 0.1
loss_type = "sigmoid"
reference = "precompute"
lr = 1e-4
batch_size = 16
max_iters = 150
log_interval = 10
eval_interval = 50
eval_pairs = 300
eval_examples = 200
#< L11
