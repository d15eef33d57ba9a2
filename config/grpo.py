#> L13 config
# GRPO from the SFT model of lesson 10 with a verifiable reward (exact match on story questions).
# python rl.py config/grpo.py
method = "grpo"
init = "out/sft"
out_dir = "out/grpo"
# story, not arithmetic: lesson 10's model answers 1.5% of the sums, and RL can only
# reinforce right answers it sometimes samples; story questions it gets 80% right (lesson 10).
task = "story"
lr = 1e-4
prompts_per_iter = 8
samples_per_prompt = 8
kl_coef = 0.04
mu = 1
minibatch_size = 32
loss_agg = "grpo"
adv_scale = "group"
max_iters = 200
log_interval = 10
eval_interval = 100
eval_examples = 200
#< L13
