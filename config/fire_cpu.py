# The quick-start model (config/quickstart.py: embedded dataset, CPU, a few minutes) with
# pos_emb='fire':
# $ python train.py config/fire_cpu.py && python sample.py --out_dir=out-fire-cpu
import os

exec(open(os.path.join(os.path.dirname(__file__), 'quickstart.py')).read())
pos_emb = 'fire'
out_dir = 'out-fire-cpu'
