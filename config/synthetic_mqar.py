# Multi-query associative recall (Zoology) at T=32: 4 key-value pairs, each key queried once, loss
# on the answers only. Generated on the fly from the seed (no files); 1,500 steps, 17 s on the
# 2-core CPU:
# $ python train.py config/synthetic_mqar.py && python eval.py --out_dirs=out-synthetic-mqar
# (eval.py reports answer accuracy at 32, 64 and 128: 4, 8 and 16 pairs, longer gaps)
# weight_init='pytorch' is what makes this learn in seconds: with GPT-2's init (N(0, 0.02), tied
# embeddings) this d=64 model sat at the plateau of picking one of the values in context (loss ln 4)
# for 20,000 steps: the key -> value lookup (an induction circuit) forms late from tiny weights.
# Measured (2026-11-23): weight_init='pytorch' solved it (val loss < 0.02) by step 750 for each of
# 5 seeds (1, 2, 3, 4, 1337); with 2 heads, 2 of 3 seeds.
import os

# the same tiny model and schedule
exec(open(os.path.join(os.path.dirname(__file__), 'synthetic_copy.py')).read())
out_dir = 'out-synthetic-mqar'
dataset = 'mqar'
weight_init = 'pytorch'
n_head = 4
block_size = 32
weight_decay = 0.1
max_iters = 1500
lr_decay_iters = 1500
