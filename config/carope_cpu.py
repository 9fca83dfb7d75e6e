# The quick-start model (4 layers, 4 heads, 128 wide, T=256) with CARoPE, on the embedded dataset,
# on a CPU:
# $ python train.py config/carope_cpu.py && python sample.py --out_dir=out-carope-cpu
import os

exec(open(os.path.join(os.path.dirname(__file__), 'quickstart.py')).read())
pos_emb = 'carope'
out_dir = 'out-carope-cpu'
