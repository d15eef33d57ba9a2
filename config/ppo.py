#> L12 config
# PPO from the SFT model of lesson 10 with a rule reward (exact match on arithmetic).
# python align.py config/ppo.py            (--reward=model: the reward model of config/reward.py)
method = "ppo"
init = "out/sft"
out_dir = "out/ppo"
task = "arith"
reward = "rule"
lr = 3e-5
prompts_per_iter = 8
samples_per_prompt = 4
max_new_tokens = 8
kl_coef = 0.05
max_kl = 5.0
ppo_epochs = 4
minibatch_size = 8
max_iters = 60
log_interval = 5
eval_interval = 20
eval_examples = 200
#< L12
