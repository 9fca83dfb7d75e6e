# Selective RoPE on the embedded dataset, quick-start sized (config/quickstart.py), on a laptop CPU:
# $ python train.py config/selective_cpu.py && python sample.py --out_dir=out-selective-cpu
import os

exec(open(os.path.join(os.path.dirname(__file__), 'quickstart.py')).read())
pos_emb = 'selective'
out_dir = 'out-selective-cpu'
