# GPT-2 small (124M) on FineWeb-Edu exactly as config/gpt2_rope.py, with PoPE (Gopalakrishnan et
# al., arXiv:2509.10534): softplus magnitudes from content, phases from position, q and k twice the
# head width.
# $ torchrun --standalone --nproc_per_node=8 train.py config/pope.py
import os

exec(open(os.path.join(os.path.dirname(__file__), 'gpt2_rope.py')).read())
pos_emb = 'pope'
out_dir = 'out-gpt2-pope'
