#> L11 config
# DPO from the SFT model of lesson 10 on story-question pairs (right vs wrong answer).
# python data/prepare.py dpo && python align.py config/dpo.py
method = "dpo"
init = "out/sft"
out_dir = "out/dpo"
beta = 0.1
loss_type = "sigmoid"
reference = "precompute"
# From lesson 10's model (story questions 99.0%, the report machine): held-out pair accuracy
# 99.0%, story questions 99.0%. Without the NLL term on the chosen answers (--rpo_alpha=0) their
# log-prob falls from -0.07 to -7.4 nats and the story questions to 28.0% (lessons.md, lesson 11).
rpo_alpha = 1.0
lr = 5e-4
batch_size = 8
max_iters = 700
log_interval = 10
eval_interval = 350
eval_pairs = 300
eval_examples = 200
#< L11
