# GPT-2 small (124M) on FineWeb-Edu exactly as config/gpt2_rope.py, with p-RoPE (Barbero et al.,
# ICLR 2025, arXiv:2410.06205): only the highest-frequency quarter of each head's pairs rotate
# (rope_fraction=0.25, our choice of p; p = 1 is rope, p = 0 NoPE), the rest carry no position.
# $ torchrun --standalone --nproc_per_node=8 train.py config/prope.py
import os

exec(open(os.path.join(os.path.dirname(__file__), 'gpt2_rope.py')).read())
rope_fraction = 0.25
out_dir = 'out-gpt2-prope'
