# GPT-2 small (124M) on FineWeb-Edu exactly as config/gpt2_rope.py, with pos_emb='crope'
# (CRoPE arXiv:2601.02728): complex-linear Q/K/V projections, 10,616,832 fewer weights than rope,
# the same FLOPs.
# $ torchrun --standalone --nproc_per_node=8 train.py config/crope.py
import os

exec(open(os.path.join(os.path.dirname(__file__), 'gpt2_rope.py')).read())
pos_emb = 'crope'
out_dir = 'out-gpt2-crope'
