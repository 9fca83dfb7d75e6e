# GPT-2 small (124M) on FineWeb-Edu exactly as config/gpt2_rope.py, with LieRE (Ostmeier et al.,
# arXiv:2406.10322) on text's one axis: R(t) = exp(t A), one dense 64 x 64 skew-symmetric generator
# per layer and head, i.e. ComRoPE-AP with a single block of the whole head dim (comrope_block =
# n_embd // n_head), initialised to RoPE's generator.
# $ torchrun --standalone --nproc_per_node=8 train.py config/liere.py
import os

exec(open(os.path.join(os.path.dirname(__file__), 'gpt2_rope.py')).read())
pos_emb = 'comrope_ap'
comrope_block = n_embd // n_head  # 64: one dense block = LieRE
comrope_init = 'rope'
out_dir = 'out-gpt2-liere'
