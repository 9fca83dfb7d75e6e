# GPT-2 small (124M) on FineWeb-Edu exactly as config/gpt2_rope.py, with ComRoPE-AP
# (arXiv:2506.03737, eq. 8): trainable 8 x 8 skew-symmetric angle blocks per layer and head,
# initialised to RoPE (comrope_init='rope').
# $ torchrun --standalone --nproc_per_node=8 train.py config/comrope.py
# ComRoPE-LD (eq. 10, one trainable scale per layer and block):
# --pos_emb=comrope_ld --out_dir=out-gpt2-comrope-ld
import os

exec(open(os.path.join(os.path.dirname(__file__), 'gpt2_rope.py')).read())
pos_emb = 'comrope_ap'
comrope_block = 8
comrope_init = 'rope'
out_dir = 'out-gpt2-comrope'
