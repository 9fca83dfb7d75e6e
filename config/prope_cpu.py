# The quick-start model (config/quickstart.py: embedded dataset, CPU, a few minutes) with p-RoPE, p
# = 0.25:
# $ python train.py config/prope_cpu.py && python sample.py --out_dir=out-prope-cpu
import os

exec(open(os.path.join(os.path.dirname(__file__), 'quickstart.py')).read())
rope_fraction = 0.25
out_dir = 'out-prope-cpu'
