# The quick-start model (config/quickstart.py: embedded dataset, CPU, a few minutes) with
# pos_emb='pope':
# $ python train.py config/pope_cpu.py && python sample.py --out_dir=out-pope-cpu
import os

exec(open(os.path.join(os.path.dirname(__file__), 'quickstart.py')).read())
pos_emb = 'pope'
out_dir = 'out-pope-cpu'
