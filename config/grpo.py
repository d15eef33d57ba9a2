#> L13 config
# GRPO from the SFT model of lesson 10 with a verifiable reward (exact match on story questions).
# python rl.py config/grpo.py
method = "grpo"
init = "out/sft"
out_dir = "out/grpo"
# The held-out story questions of lesson 10 (data/sft/eval_story.jsonl): RL can only reinforce
# right answers the model sometimes samples, and these it often gets right.
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
