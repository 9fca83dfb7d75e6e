# GPT-2 small (124M) on FineWeb-Edu exactly as config/gpt2_rope.py, with Selective RoPE
# (arXiv:2511.17388):
# $ torchrun --standalone --nproc_per_node=8 train.py config/selective.py
# The selective_* options keep GPTConfig's defaults, the released code's language-modelling setting:
# per-head weight-normalised projection, width-4 causal conv + SiLU, phase gate, no bias. The paper
# pairs Selective RoPE with a forget gate (its "FoX Selective" models); for that add
# --forget_gate=True.
import os

exec(open(os.path.join(os.path.dirname(__file__), 'gpt2_rope.py')).read())
pos_emb = 'selective'
out_dir = 'out-gpt2-selective'
