# The CPU quick-start (config/quickstart.py: embedded dataset, 4 layers, d=128, T=256) with
# ComRoPE-AP.
# $ python train.py config/comrope_cpu.py            (ComRoPE-LD: add --pos_emb=comrope_ld)
import os

exec(open(os.path.join(os.path.dirname(__file__), 'quickstart.py')).read())
pos_emb = 'comrope_ap'
out_dir = 'out-comrope-cpu'
