# Multi-query associative recall (Zoology) at T=64: 8 key-value pairs, each key queried once, loss on the
# answers only. Generated on the fly from the seed (no files); ~1 min on one CPU thread:
# $ python train.py config/synthetic_mqar.py && python eval.py --out_dirs=out-synthetic-mqar
# (eval.py reports answer accuracy at 64, 128 and 256: 16 and 32 pairs, longer gaps)
# Measured (2026-11-23): this GPT-2-initialised d=64 model does not get past the plateau of picking one of the
# values in context (val loss ~ln 8, accuracy ~0.17) on a CPU budget: at T=32 (4 pairs) it was still at ln 4 after
# 20,000 steps (6.5 min); 4x the width, 4 layers/heads, lr 1e-2 or biases did no better in 3,000-6,000 steps. The
# key -> value lookup (an induction circuit) forms suddenly and late. The data is not the obstacle: a plain
# reference transformer (PyTorch's default init, N(0, 1) untied token embeddings, random biases) on the same 4-pair
# batches formed it within 2,000 steps for 3 of 4 seeds, and not with its token embeddings at GPT-2's 0.02: the
# small init (tied to the output layer here) is the likely cause at d=64.
# Zoology's own recipe trains up to 100 epochs of 10,000 sequences (~31,000 steps); raise max_iters on a GPU.
import os

exec(open(os.path.join(os.path.dirname(__file__), 'synthetic_copy.py')).read())  # the same tiny model and schedule
out_dir = 'out-synthetic-mqar'
dataset = 'mqar'
weight_decay = 0.1
max_iters = 2000
lr_decay_iters = 2000
