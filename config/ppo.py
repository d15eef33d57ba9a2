#> L12 config
# PPO from the SFT model of lesson 10 with a rule reward (exact match).
# python rl.py config/ppo.py               (--reward=model: the reward model of config/reward.py,
#                                          which PPO learns to fool: lessons.md, lesson 12)
method = "ppo"
init = "out/sft"
out_dir = "out/ppo"
# Lesson 10's "What did Omar lose?" about 3,000 training stories (data/sft/lost.jsonl): the
# lookup SFT forms halfway, so some of the samples are right where greedy is wrong.
task = "lost"
prompts = "data/sft/lost.jsonl"
reward = "rule"
lr = 1e-4
prompts_per_iter = 8
# 8 samples a prompt: 18.5% -> 54.5% held-out, story questions 69.0% -> 74.0% (the report
# machine, lessons.md, lesson 12). With 4, on a 2-core AVX2 EPYC from its 88.0% SFT model:
# 36.5% -> 40.5%, against 50.5% with 8.
samples_per_prompt = 8
kl_coef = 0.05
max_kl = 5.0
# 64 rollouts in minibatches of 16, twice over: 8 updates a batch (TRL: 4 epochs; 2 fit the CPU budget)
ppo_epochs = 2
minibatch_size = 16
max_iters = 150  # 6.2 min alone with 2 threads on the report machine (fp32), 12.1 on one beside another run
log_interval = 10
eval_interval = 50
eval_examples = 200
#< L12
