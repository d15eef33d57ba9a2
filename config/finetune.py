#> L14 adapt
# Lesson 14: teach the lesson-10 chat model a new family of questions, every one
# beginning "Which" ("Which colour did the kite have?"), with the same answers,
# by fine-tuning every weight. config/lora.py and config/qlora.py train adapters on the
# same data, steps and seed. The set mixes 3,000 such chats with 3,000 of lesson
# 10's, so the old questions are rehearsed; each run prints exact match on both, before and after.
# python sft.py config/finetune.py   (after python sft.py config/sft.py)
init = "out/sft"
out_dir = "out/finetune"
data = "data/sft/adapt.jsonl"
task = "which"  # eval.py --task which: held-out stories, data/sft/eval_which.jsonl
batch_size = 16
max_iters = 600
lr = 1e-3
min_lr = 1e-4
warmup_iters = 20
eval_interval = 200
log_interval = 50
eval_n = 200
#< L14
