# Running parity at T=32: random bits, and after each bit the parity so far (state tracking; loss on every
# answer). Generated on the fly from the seed (no files). Softmax attention has no running state: measured,
# this rope model stays near chance (accuracy 0.52 at T=32 after 2000 steps, ~1 min): the baseline that
# input-dependent rotations (Selective RoPE) are meant to beat:
# $ python train.py config/synthetic_parity.py && python eval.py --out_dirs=out-synthetic-parity
import os

exec(open(os.path.join(os.path.dirname(__file__), 'synthetic_copy.py')).read())  # the same tiny model and schedule
out_dir = 'out-synthetic-parity'
dataset = 'parity'
block_size = 32
max_iters = 2000
lr_decay_iters = 2000
