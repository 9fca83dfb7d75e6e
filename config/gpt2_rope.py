# GPT-2 small (124M) on FineWeb-Edu 10B with RoPE: the build-nanogpt recipe.
# $ python prepare_data.py --dataset=fineweb_edu
# $ torchrun --standalone --nproc_per_node=8 train.py config/gpt2_rope.py
# 16 x 1024 tokens x 4 micro-steps x 8 GPUs = 524,288 tokens per step (~0.5M); 19,073 steps = 10B
# tokens. On fewer GPUs gradient accumulation keeps the same global batch (it is divided by the
# process count).
# Any other encoding is this run with --pos_emb=NAME --out_dir=out-gpt2-NAME (docs/training.md):
# $ torchrun --standalone --nproc_per_node=8 train.py config/gpt2_rope.py --pos_emb=alibi \
#     --out_dir=out-gpt2-alibi
out_dir = 'out-gpt2-rope'
dataset = 'fineweb_edu'
pos_emb = 'rope'

n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
vocab_size = 50304
batch_size = 16
gradient_accumulation_steps = 4 * 8

learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 715
max_iters = 19073
lr_decay_iters = 19073
weight_decay = 0.1

eval_interval = 250
eval_iters = 20  # 20 * 16 * 1024 = 327,680 fixed val tokens
log_interval = 10
