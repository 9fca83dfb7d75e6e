# The quick-start model (config/quickstart.py: embedded dataset, CPU, a few minutes) with
# pos_emb='cope':
# $ python train.py config/cope_cpu.py && python sample.py --out_dir=out-cope-cpu
import os

exec(open(os.path.join(os.path.dirname(__file__), 'quickstart.py')).read())
pos_emb = 'cope'
out_dir = 'out-cope-cpu'
