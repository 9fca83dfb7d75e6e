# Running parity at T=32 (state tracking): a start token, random bits, and after each bit the parity so far; loss
# on every answer. Generated on the fly from the seed (no files); 2000 steps, about 1 min on one CPU thread.
# Softmax attention has no running state, so rope stays at chance (--pos_emb=rope: accuracy ~0.5); Selective RoPE's
# input-dependent rotation can carry it (a rotation by pi per 1-bit, read off against the start token):
# $ python train.py config/synthetic_parity.py && python eval.py --out_dirs=out-synthetic-parity
# Measured (2026-11-23, answer accuracy @32/@64/@128): seed 1337 0.79/0.65/0.57, --seed=1 0.999/0.84/0.67. Whether
# and when the rotation locks onto pi varies with the seed at this size; README "Results" has the rope comparison.
import os

exec(open(os.path.join(os.path.dirname(__file__), 'synthetic_copy.py')).read())  # the same tiny model and schedule
out_dir = 'out-synthetic-parity'
dataset = 'parity'
pos_emb = 'selective'
block_size = 32
max_iters = 2000
lr_decay_iters = 2000
