# GPT-2 small (124M) on FineWeb-Edu exactly as config/gpt2_rope.py, with CoPE (Golovneva et al.,
# arXiv:2405.18719): positions counted by sigmoid gates of q.k, block_size + 1 learned position
# embeddings per layer (cope_npos_max=0, the authors' code's default). Its gates, counts and bias
# are T x T tensors per head on every device (and q.e[n], T x (T + 1)): at T=1024 each is
# 16 x 12 x 1024^2 x 4 bytes = 0.8 GB per layer for a micro-batch of 16, about ten of them are kept
# for backward, so the micro-batch is 4 here and gradient accumulation keeps gpt2_rope.py's 524,288
# tokens per step (4 x 1024 x 16 micro-steps x 8 GPUs).
# $ torchrun --standalone --nproc_per_node=8 train.py config/cope.py
import os

exec(open(os.path.join(os.path.dirname(__file__), 'gpt2_rope.py')).read())
pos_emb = 'cope'
out_dir = 'out-gpt2-cope'
batch_size = 4
gradient_accumulation_steps = 16 * 8
