# GPT-2 small (124M) with CARoPE on FineWeb-Edu 10B: the CARoPE paper's recipe (arXiv:2507.23083,
# section 3.2): T=512, 524,288 tokens per step, 19k steps, LR 6e-4 with 750 warmup steps and cosine
# decay to 6e-5, vocab 50304.
# $ python prepare_data.py --dataset=fineweb_edu
# $ torchrun --standalone --nproc_per_node=8 train.py config/carope.py
# 32 x 512 tokens x 4 micro-steps x 8 GPUs = 524,288 tokens per step; 19,000 steps = 9.96B tokens.
# The paper's 2x extrapolation column (eval at T=1024, table 1) from the final checkpoint:
# $ python train.py config/carope.py --init_from=resume --eval_only=True --eval_block_size=1024
# The baseline with the same recipe: add --pos_emb=rope --out_dir=out-gpt2-rope-512.
import os

exec(open(os.path.join(os.path.dirname(__file__), 'gpt2_rope.py')).read())
pos_emb = 'carope'
# x_t = each attention's LayerNorm'd input; 'embedding' = the token embeddings
carope_source = 'block'
out_dir = 'out-gpt2-carope'

# the paper's text says "12 layers, 10 heads", but 768 is not divisible by 10: 12 heads, as GPT-2
n_layer = 12
n_head = 12
n_embd = 768
block_size = 512  # train and evaluate at 512 (eval_block_size = 0 means block_size)
vocab_size = 50304
batch_size = 32
gradient_accumulation_steps = 4 * 8  # global; each of 8 GPUs does 4

learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 750
max_iters = 19000
lr_decay_iters = 19000

# 20 * 32 * 512 = 327,680 fixed val tokens (eval_block_size=1024: same tokens, 2x longer windows)
eval_iters = 20
