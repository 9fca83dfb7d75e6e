# GPT-2 small (124M) on FineWeb-Edu exactly as config/gpt2_rope.py, with T5's relative attention
# bias (Raffel et al., arXiv:1910.10683 section 2.1): 32 causal buckets up to distance 128, one
# table for all layers.
# $ torchrun --standalone --nproc_per_node=8 train.py config/t5.py
import os

exec(open(os.path.join(os.path.dirname(__file__), 'gpt2_rope.py')).read())
pos_emb = 't5'
out_dir = 'out-gpt2-t5'
