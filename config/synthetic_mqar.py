# Multi-query associative recall (Zoology) at T=64: 8 key-value pairs, each key queried once, loss on the
# answers only. Generated on the fly from the seed (no files); ~90 s on one CPU thread:
# $ python train.py config/synthetic_mqar.py && python eval.py --out_dirs=out-synthetic-mqar
# (eval.py reports answer accuracy at 64, 128 and 256: 16 and 32 pairs, longer gaps)
# Measured: in 2000 steps this model only reaches the plateau of picking one of the 8 values in context
# (val loss ~2.1 = ln 8, accuracy 0.17); 4x the width and batch did no better in 1500 steps. Breaking the
# plateau (an induction-style key -> value lookup) needs a longer run: raise max_iters.
import os

exec(open(os.path.join(os.path.dirname(__file__), 'synthetic_copy.py')).read())  # the same tiny model and schedule
out_dir = 'out-synthetic-mqar'
dataset = 'mqar'
weight_decay = 0.1
max_iters = 2000
lr_decay_iters = 2000
