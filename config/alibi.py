# GPT-2 small (124M) on FineWeb-Edu exactly as config/gpt2_rope.py, with ALiBi (Press et al.,
# arXiv:2108.12409): no position embedding, a per-head linear distance penalty on the attention
# scores (FlexAttention on CUDA).
# $ torchrun --standalone --nproc_per_node=8 train.py config/alibi.py
import os

exec(open(os.path.join(os.path.dirname(__file__), 'gpt2_rope.py')).read())
pos_emb = 'alibi'
out_dir = 'out-gpt2-alibi'
