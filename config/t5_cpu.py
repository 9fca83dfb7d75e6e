# The quick-start model (config/quickstart.py: embedded dataset, CPU, a few minutes) with
# pos_emb='t5':
# $ python train.py config/t5_cpu.py && python sample.py --out_dir=out-t5-cpu
import os

exec(open(os.path.join(os.path.dirname(__file__), 'quickstart.py')).read())
pos_emb = 't5'
out_dir = 'out-t5-cpu'
