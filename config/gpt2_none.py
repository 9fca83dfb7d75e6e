# GPT-2 small (124M) on FineWeb-Edu exactly as config/gpt2_rope.py, with pos_emb='none'.
import os

exec(open(os.path.join(os.path.dirname(__file__), 'gpt2_rope.py')).read())
pos_emb = 'none'
out_dir = 'out-gpt2-none'
