#> L12 config
# PPO from the SFT model of lesson 10 with a rule reward (exact match).
# python rl.py config/ppo.py               (--reward=model: the reward model of config/reward.py,
#                                          which PPO may learn to fool: lessons.md, lesson 12)
method = "ppo"
init = "out/sft"
out_dir = "out/ppo"
# Lesson 10's "What did Omar lose?" about 3,000 training stories (data/sft/lost.jsonl): the
# lookup SFT may form only partly, so some of the samples are right where greedy is wrong.
task = "lost"
prompts = "data/sft/lost.jsonl"
reward = "rule"
lr = 1e-4
prompts_per_iter = 8
# 8 samples a prompt: 87.0% -> 98.0% held-out, story questions 99.0% -> 99.0% (the report
# machine, lessons.md, lesson 12).
samples_per_prompt = 8
kl_coef = 0.05
max_kl = 5.0
# 64 rollouts in minibatches of 16, twice over: 8 updates a batch (TRL: 4 epochs; 2 fit the CPU budget)
ppo_epochs = 2
minibatch_size = 16
max_iters = 150  # 9.8 min on one thread of the report machine (fp32), beside another run
log_interval = 10
eval_interval = 50
eval_examples = 200
#< L12
