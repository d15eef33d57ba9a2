#> L13 config
# GRPO from the SFT model of lesson 10 with a verifiable reward (exact match).
# python rl.py config/grpo.py
method = "grpo"
init = "out/sft"
out_dir = "out/grpo"
# Lesson 10's "What did Omar lose?" about 3,000 training stories (data/sft/lost.jsonl): the
# lookup SFT may form only partly, so some of the 8 samples are right where greedy is wrong.
# `--task=herokind --prompts=data/sft/herokind.jsonl` is the control: a lookup it lacks.
task = "lost"
prompts = "data/sft/lost.jsonl"
# lr 2e-4 for 300 iterations, from lesson 10's default model on the report machine: held-out
# lost-task 87.0% -> 98.0% (99.0%, 97.0% with seeds 1, 2; pass@8 was 96.0-98.0%), story
# questions 99.0% -> 99.5% (96.0%, 91.5%) (lessons.md, lesson 13).
lr = 2e-4
prompts_per_iter = 8
samples_per_prompt = 8
kl_coef = 0.04
mu = 1
minibatch_size = 32
loss_agg = "grpo"
adv_scale = "group"
max_iters = 300  # 1.5 s an iteration on one thread of the report machine (fp32): 7.7 min
log_interval = 10
eval_interval = 100
eval_examples = 200
#< L13
