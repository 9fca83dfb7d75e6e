# GPT-2 small (124M) on FineWeb-Edu exactly as config/gpt2_rope.py, with xPos (Sun et al.,
# arXiv:2212.10554 section 3.2): RoPE with a per-pair scale zeta^(n/512) on q and zeta^(-m/512) on
# k, no parameters.
# $ torchrun --standalone --nproc_per_node=8 train.py config/xpos.py
import os

exec(open(os.path.join(os.path.dirname(__file__), 'gpt2_rope.py')).read())
pos_emb = 'xpos'
out_dir = 'out-gpt2-xpos'
