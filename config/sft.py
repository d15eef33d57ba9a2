#> L10 config
# Lesson 10: fine-tune the base model of config/tiny.py on the story world's chats.
# python sft.py config/sft.py   (after python pretrain.py config/tiny.py)
#> L14 lora
# Lesson 14, LoRA / QLoRA on the same data, seed and steps (an adapter needs a larger lr):
# python sft.py config/sft.py --lora_rank=8 --lr=5e-3 --min_lr=5e-4 --out_dir=out/sft_lora
# python sft.py config/sft.py --lora_rank=8 --qlora=True --lr=5e-3 --min_lr=5e-4 --out_dir=out/sft_qlora
#< L14
init = "out/tiny"
out_dir = "out/sft"
# 16 conversations x 1,500 steps: 4.6 minutes on one thread of this course's 2-core EPYC.
# Held-out 84% from the earlier base (val 0.534), 43% from the one today's code trains (0.547):
# which lookups SFT forms depends on the base (lessons.md, lesson 10; the log prints each kind).
batch_size = 16
pack = True  # same loss as padding (tests/test_l10_sft.py), fewer wasted positions
max_iters = 1500
lr = 2e-3  # pretraining's peak (1e-3 learned more slowly)
min_lr = 2e-4
warmup_iters = 50
eval_interval = 250
log_interval = 100
eval_n = 200
#< L10
