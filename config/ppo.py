#> L12 config
# PPO from the SFT model of lesson 10 with a rule reward (exact match on story questions).
# python rl.py config/ppo.py               (--reward=model: the reward model of config/reward.py)
method = "ppo"
init = "out/sft"
out_dir = "out/ppo"
# story, not arithmetic: lesson 10's model answers 1.5% of the sums, and RL can only
# reinforce right answers it sometimes samples; story questions it gets 80% right (lesson 10).
task = "story"
reward = "rule"
lr = 1e-4
prompts_per_iter = 8
samples_per_prompt = 4
kl_coef = 0.05
max_kl = 5.0
# 2 epochs of 2 minibatches (TRL: 4 epochs): 4 updates per batch of rollouts fit the CPU budget
ppo_epochs = 2
minibatch_size = 16
max_iters = 150
log_interval = 10
eval_interval = 50
eval_examples = 200
#< L12
