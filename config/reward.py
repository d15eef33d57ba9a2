#> L12 config
# A Bradley-Terry reward model on the DPO pairs, from the SFT model of lesson 10.
# python align.py config/reward.py
method = "reward"
init = "out/sft"
out_dir = "out/reward"
# The score alone learned too slowly: 78% held-out pair accuracy after 900 steps (fp32), 88-89%
# after 2,700, and the friend's kind stayed at chance. With an NLL term on the chosen answers
# (GRM), this config: 87.0% from lesson 10's default model on the report machine, 7.4 min on one
# thread; 95.0% from the 88.0% SFT model of a 2-core AVX2 EPYC (lessons.md, lesson 12).
rm_nll_coef = 0.3
lr = 5e-4
batch_size = 8
max_iters = 2200
# bf16 autocast where the CPU has it natively: 1.65x faster here (2-core EPYC with avx512_bf16)
dtype = "auto"
log_interval = 10
eval_interval = 1100
eval_pairs = 300
#< L12
