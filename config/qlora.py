#> L14 adapt
# Lesson 14: teach the lesson-10 chat model a new family of questions, every one
# beginning "Which" ("Which colour did the kite have?"), with the same answers,
# with QLoRA (Dettmers et al. 2023): config/lora.py over a base stored in 4-bit NF4.
# Same data, steps and seed as config/finetune.py. The set mixes 3,000 such chats with 3,000 of lesson
# 10's, so the old questions are rehearsed; each run prints exact match on both, before and after.
# python sft.py config/qlora.py   (after python sft.py config/sft.py)
init = "out/sft"
out_dir = "out/qlora"
data = "data/sft/adapt.jsonl"
task = "which"  # eval.py --task which: held-out stories, data/sft/eval_which.jsonl
batch_size = 16
max_iters = 600
lora_rank = 8
qlora = True
lora_alpha = 16.0
lora_tokens = "none"  # the chat tokens trained in lesson 10: nothing new to learn there
lr = 5e-3  # an adapter starts at zero (B = 0) and needs a larger step
min_lr = 5e-4
warmup_iters = 20
eval_interval = 200
log_interval = 50
eval_n = 200
#< L14
