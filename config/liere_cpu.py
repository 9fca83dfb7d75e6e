# The CPU quick-start (config/quickstart.py) with LieRE: comrope_ap with one dense block of the head
# dim (32).
# $ python train.py config/liere_cpu.py && python sample.py --out_dir=out-liere-cpu
import os

exec(open(os.path.join(os.path.dirname(__file__), 'quickstart.py')).read())
pos_emb = 'comrope_ap'
comrope_block = n_embd // n_head  # 32: one dense block = LieRE
out_dir = 'out-liere-cpu'
