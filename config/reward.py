#> L12 config
# A Bradley-Terry reward model on the DPO pairs, from the SFT model of lesson 10.
# python align.py config/reward.py
method = "reward"
init = "out/sft"
out_dir = "out/reward"
lr = 3e-4
batch_size = 8
# 96 s with 2 threads (3.1 min on one): held-out pair accuracy 69% at 300 steps, 66% at 600, 78%
# at 900 from today's 80% SFT model. 450 steps gave 68%; lr 5e-4: 71%, 1e-3: 62% (lessons.md, 12)
max_iters = 900
log_interval = 10
eval_interval = 300
eval_pairs = 300
#< L12
