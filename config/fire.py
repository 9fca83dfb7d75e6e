# GPT-2 small (124M) on FineWeb-Edu exactly as config/gpt2_rope.py, with FIRE (Li et al.,
# arXiv:2310.04418): a learned MLP of the log-scaled, position-normalised distance, one module for
# all layers.
# $ torchrun --standalone --nproc_per_node=8 train.py config/fire.py
import os

exec(open(os.path.join(os.path.dirname(__file__), 'gpt2_rope.py')).read())
pos_emb = 'fire'
out_dir = 'out-gpt2-fire'
