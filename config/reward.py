#> L12 config
# A Bradley-Terry reward model on the DPO pairs, from the SFT model of lesson 10.
# python align.py config/reward.py
method = "reward"
init = "out/sft"
out_dir = "out/reward"
lr = 3e-4
batch_size = 8
# 1.5 min: held-out pair accuracy 54% at 150 steps, 61% at 300, 68% at 450 from today's 80% SFT
# model (68% from an earlier 84% one; lr 1e-3 x 900 steps: 62%; lessons.md, lesson 12)
max_iters = 450
log_interval = 10
eval_interval = 150
eval_pairs = 300
#< L12
