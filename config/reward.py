#> L12 config
# A Bradley-Terry reward model on the DPO pairs, from the SFT model of lesson 10.
# python align.py config/reward.py
method = "reward"
init = "out/sft"
out_dir = "out/reward"
# With an NLL term on the chosen answers (GRM) beside the Bradley-Terry score: 93.3% held-out
# pair accuracy from lesson 10's default model on the report machine, 2.9 min with 2 threads
# (lessons.md, lesson 12); 78.7% at step 900.
rm_nll_coef = 0.3
lr = 5e-4
batch_size = 8
max_iters = 1800
# bf16 autocast where the CPU has it natively (avx512_bf16/AMX); fp32 elsewhere
dtype = "auto"
log_interval = 10
eval_interval = 900
eval_pairs = 300
#< L12
